"""The benchmarks behind `python -m gqa_uptrain.bench SUBCOMMAND`, one module each.

Each module has `add_arguments(parser)` and `run(args) -> headline dict`; bench.py registers them.
A run prints a readable Markdown table; bench.py prints the headline as the LAST line, one JSON
object whose keys each module's docstring documents.
"""
