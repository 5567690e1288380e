"""Stage 4, allocate: a type per tensor under a whole-file size or a bit budget. Budgets and their costs
(`budget`), the allocators that read a sensitivity (`allocators`: uniform, greedy knapsack, projection onto a
size), and the learned ones in `sac/`.

Floor 6: imports `fold`, `measure` and everything below. A new allocator goes in `allocators.ALLOCATORS`
(or beside `sac/` when it learns) and takes a `Sensitivity` and a byte target.
"""
