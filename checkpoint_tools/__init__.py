"""`python -m checkpoint_tools ...` = `aipo-mp convert ...` (the code lives in aipo_mp/convert/).
Kept for users and Slurm scripts that call the old module path."""
