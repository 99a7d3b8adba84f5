"""The torch.compile measurement script runs and reports every variant."""

from benchmark.bench_torch_compile import main


def test_bench_torch_compile_reports_all_variants():
    rows = main(["--rows", "1", "4", "--hidden", "64", "--intermediate", "128", "--iters", "2", "--rounds", "1", "--json"])
    assert [r["rows"] for r in rows] == [1, 4]
    for r in rows:
        for key in ("eager_prepacked_us", "eager_us", "compiled_us"):
            assert r[key] > 0
        assert r["compiled_vs_eager_prepacked"] > 0
