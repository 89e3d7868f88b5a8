"""One federated round, as pure steps both the real system and the simulation run.

- :mod:`edge_runtime.round.device`: what a device does with a round manifest (evaluate the received
  global, personalise, train, build the upload), called by the agent;
- :mod:`edge_runtime.round.server`: what the server decides (who takes part, the weights, the
  method's aggregate checked, the history row), called by the coordinator.
"""
