"""gRPC servicers of the agent."""
