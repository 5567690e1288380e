"""The parsers of bench/studies/referee.py on llama-perplexity output captured from a real run (the demo's
SAC GGUF vs its off-grid F16 base, 16 chunks of 512; tests/data/referee/). Building llama.cpp's tools takes
~10 minutes on 2 cores, so the tools themselves are not run here.

Each captured file is what the referee logs: a `$ command` and `# exit` header, then the tool's stdout, then
its stderr; the parsers are given that same concatenation by the referee.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.studies import referee as ref

DATA = Path(__file__).parent / "data" / "referee"


@pytest.fixture(scope="module")
def ppl_out() -> str:
    return (DATA / "llama-perplexity.ppl.log").read_text()


@pytest.fixture(scope="module")
def kld_out() -> str:
    return (DATA / "llama-perplexity.kld.log").read_text()


def test_final_ppl(ppl_out: str) -> None:
    # the "Final estimate" line shares its line with the stderr ETA text: the regex must not anchor on ^
    assert ref.parse_final_ppl(ppl_out) == (29.0140, 1.40088)


def test_final_ppl_of_the_base_logits_run() -> None:
    out = (DATA / "llama-perplexity.kld-base.log").read_text()
    assert ref.parse_final_ppl(out) == (28.4859, 1.36902)
    assert ref.parse_chunks_line(out) == (16, 512)


def test_running_ppl_per_chunk(ppl_out: str) -> None:
    ppls = ref.parse_chunk_ppls(ppl_out)
    assert len(ppls) == 16
    assert ppls[0] == 12.7708 and ppls[-1] == 29.0140


def test_chunks_line_both_modes(ppl_out: str, kld_out: str) -> None:
    assert ref.parse_chunks_line(ppl_out) == (16, 512)
    assert ref.parse_chunks_line(kld_out) == (16, 512)


def test_kld_summary(kld_out: str) -> None:
    k = ref.parse_kld(kld_out)
    assert (k["kld_mean"], k["kld_mean_err"]) == (0.024311, 0.000632)
    assert (k["ppl_q"], k["ppl_q_err"]) == (29.013970, 1.400882)
    assert (k["ppl_base"], k["ppl_base_err"]) == (28.441786, 1.363550)
    assert (k["ln_ppl_ratio"], k["ln_ppl_ratio_err"]) == (0.019918, 0.004065)
    assert (k["same_top_pct"], k["same_top_pct_err"]) == (89.559, 0.479)
    assert (k["rms_dp_pct"], k["rms_dp_pct_err"]) == (3.644, 0.210)
    assert (k["kld_max"], k["kld_p99"], k["kld_median"]) == (1.192683, 0.178999, 0.016871)
    assert k["kld_p999"] == 0.419466


def test_kld_per_chunk_rows_do_not_shadow_the_summary(kld_out: str) -> None:
    # the per-chunk table prints "0.02431 ± 0.00063" in the KLD column; only the summary line may match
    assert ref.parse_kld(kld_out)["kld_mean"] != 0.02431


def test_missing_lines_are_errors(ppl_out: str, kld_out: str) -> None:
    with pytest.raises(ValueError, match="KL divergence statistics"):
        ref.parse_kld(ppl_out)
    with pytest.raises(ValueError, match="Final estimate"):
        ref.parse_final_ppl(kld_out)
    with pytest.raises(ValueError, match="chunks"):
        ref.parse_chunks_line("main: error: unable to load model\n")


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (29.0140, 29.013970771213256, True),
        (29.0140, 29.0160, True),  # rounds to 29.01 vs 29.02, yet 0.002 apart: within half a unit (0.005)
        (29.01, 29.03, False),
        (12.34499, 12.34501, True),  # straddles a rounding boundary, still the same to 4 digits
        (0.0012345, 0.0012349, True),
        (0.0012345, 0.0012400, False),
        (1.0, 1.0, True),
    ],
)
def test_agree_digits(a: float, b: float, same: bool) -> None:
    assert ref.agree_digits(a, b) is same
