"""Output: the read API of a run (live or loaded), its file, the summary, the figures and the report.

Reads tables (and the findings table diagnose made); never touches torch. Imports go one way:
run -> report -> figures/summary -> files; run -> runfile -> files.
"""
