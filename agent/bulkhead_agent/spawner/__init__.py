"""The spawner: a single-threaded fork server that creates container and exec processes.

The agent is multi-threaded (gRPC), and neither fork() nor setns() into a mount or user
namespace is safe there (DESIGN decision 4). ``client.Spawner.launch()`` forks this server
before any thread exists; the agent then talks to it over a socketpair (``protocol``).
It outlives an agent that dies, for the next one to adopt (``client.Spawner.connect``).
"""
