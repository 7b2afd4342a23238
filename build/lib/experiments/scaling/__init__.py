"""Scaling-law lab: sweep format (spec), results.jsonl schema (results), fits (fits),
point selection (analysis), figures (plots) and report.md (report). See README.md here."""
