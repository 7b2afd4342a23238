"""Scaling-law lab: sweep format (spec), one run of a sweep (runner), the Ray launcher
(launch_ray), the record schema and results.jsonl (results), fits (fits), point selection
(analysis), figures (plots) and report.md (report). See README.md here."""
