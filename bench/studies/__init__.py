"""One-off studies, each answering one question once (`python -m bench.studies.NAME`); the index of
question, command, results file and doc section is bench/studies/README.md."""
