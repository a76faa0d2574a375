"""Previewer: official fixture parity and the released checkpoint layout."""



from helpers import fixture, load_fixture_model, nchw_to_nhwc, relative_error

TOL = 1e-4  # max|Δ| ≤ TOL · max|ref|, float32


def test_matches_official(fixtures_dir, tmp_path):
    config, io, weights = fixture(fixtures_dir, "previewer")
    model = load_fixture_model("previewer", config["config"], weights, tmp_path)
    out = model(nchw_to_nhwc(io["latent"]))  # 6x5 latent: non-square, odd size
    err = relative_error(out, nchw_to_nhwc(io["out"]))
    print(f"previewer out rel err {err:.2e}")
    assert err <= TOL


