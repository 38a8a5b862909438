"""`make demo`: the tiny built-in job (`python -m aipo_mp.demo`)."""
