"""The reproduction suite (reproduce.py is its command line); see suite.py."""
