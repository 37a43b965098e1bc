"""The reproduction suite (reproduce.py is its command line); see planning.py and suite.py."""
