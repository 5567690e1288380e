"""Stages put together. A sized run is `run.run_direct`, a short function over the stages of `stages`
(prepare sources → presets → measure → decide fold → allocate → fit and write → evaluate), planned and
checked before any work by `plan`, configured by `sizedconfig`, its fold rule in `folddecision`, SAC or a
policy's rollout in `learned`, its reports in `runreport`. Beside it: the paper's `--budget` run (`paper`),
`apply` of a trained policy, the demo, the demo model's download (`fetch`) and the figures (`report`).

Floor 7: imports every stage; nothing below imports it.
"""
