"""Stages put together. A sized run is `run.run_direct`, asked by one `request.SizedRequest`: a short
function over the stages of `stages` (prepare sources → presets → measure → decide fold → allocate → fit and
write → evaluate → `neverworse`), planned and checked before any work by `plan`, configured by
`sizedconfig`, its fold setting and rule in `folddecision`, SAC or a policy's rollout in `learned`, its
reports in `runreport`. `apply` dispatches a policy by its kind; the paper's `--budget` product is its own
subpackage (`paper`). Beside them: the demo, the demo model's download (`fetch`), the figures (`report`)
and the dry run's estimate.

Floor 7: imports every stage; nothing below imports it.
"""
