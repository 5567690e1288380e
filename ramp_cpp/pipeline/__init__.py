"""Stages put together: a sized run (`run`: prepare source → measure → decide fold → allocate → fit and
write → evaluate → report), the paper's `--budget` run (`paper`), `apply` of a trained policy, the demo, the
demo model's download (`fetch`) and the reports and figures (`report`).

Floor 7: imports every stage; nothing below imports it.
"""
