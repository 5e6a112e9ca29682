"""Harnesses around the core: they run trimmed models and measure them, nothing in the core imports them.

- `trimllama.harness.evaluate`: accuracy against kept tokens on the testbed (`trimllama eval`).
- `trimllama.harness.visualize`: draw the kept patches on the tiles (`trimllama show`).
- `trimllama.testbed`: the shipped small trained Mllama and its questions (kept at its documented path).
- `trimllama.bench`: the efficiency benchmark (`trimllama bench`, kept at its documented path).
"""
