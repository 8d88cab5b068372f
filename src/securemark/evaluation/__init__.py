"""Evaluation: how well tracing holds up against the attacks.

- :mod:`~securemark.evaluation.grid`: the attack grid (every attack of the registry at
  its strengths, on single copies and coalitions), each attacked model scored through
  both channels (weights and API) beside its accuracy, whether the attack was worth it
  (better than what the attacker builds alone), and the summaries the ``attack`` stage
  writes.
"""
