"""The noise's contract: c = 100% is the input, the background never changes, the object's damage
grows as confidence falls, levels are one vectorised op with one shared eps, determinism."""

import numpy as np
import pytest

from csp_utils.dataset import csp_noise as P
from csp_utils.dataset.csp_noise import NoiseConfig


def _image(h=48, w=64, seed=0):
    """A textured image (a random field would make MSE trends trivially flat at saturation)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1) % 256
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _mask(h=48, w=64):
    m = np.zeros((h, w), bool)
    m[10:30, 15:40] = True
    m[35:40, 50:60] = True  # two objects: a union mask
    return m


ALL = tuple(range(0, 101, 10))


def test_defaults_destroy_the_object_at_zero_confidence():
    assert P.abar(0) == 1.0
    assert P.abar(NoiseConfig().t_max) <= 1e-3
    linear = NoiseConfig(schedule="linear")
    assert P.abar(linear.t_max, linear) <= 1e-3
    assert P.abar(0, linear) == 1.0
    for cfg in (NoiseConfig(), linear):  # abar falls strictly with t
        assert np.all(np.diff(P.abar(np.arange(cfg.t_max + 1), cfg)) < 0)


def test_level_to_step():
    assert [P.level_to_step(c) for c in ALL] == list(range(100, -1, -10))
    assert P.level_to_step(100, NoiseConfig(t_max=1000)) == 0
    coarse = NoiseConfig(t_max=7, levels=(0, 50, 100))
    assert P.level_to_step(0, coarse) == 7
    assert P.level_to_step(50, coarse) == 4  # 3.5 rounds half to even


@pytest.mark.parametrize("bad", [0.7, -10, 101, True, "50"])
def test_levels_must_be_integer_percents(bad):
    with pytest.raises(ValueError, match="integer"):
        P.validate_levels((100, bad))
    with pytest.raises(ValueError):
        NoiseConfig(levels=(bad,))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="schedule"):
        NoiseConfig(schedule="cosine")
    with pytest.raises(ValueError, match="noise_gamma"):
        NoiseConfig(noise_gamma=1.5)
    with pytest.raises(ValueError, match="duplicates"):
        P.validate_levels((10, 10))
    with pytest.raises(ValueError, match="mask shape"):
        P.perturb_levels(_image(), np.ones((5, 5), bool), (50,))


def test_full_confidence_is_bit_identical_and_background_untouched():
    img, m = _image(), _mask()
    out = P.perturb_levels_array(img, m, ALL, NoiseConfig(), key="s")
    assert out.dtype == np.uint8 and out.shape == (len(ALL),) + img.shape
    assert np.array_equal(out[ALL.index(100)], img)
    for arr in out:
        assert P.background_max_diff(img, arr, m) == 0
    # PIL in, PIL out: the same bytes
    pil = P.perturb(P.Image.fromarray(img), m, 100, key="s")
    assert np.array_equal(np.asarray(pil), img)


@pytest.mark.parametrize("schedule", ["geometric", "linear"])
def test_masked_error_rises_as_confidence_falls(schedule):
    img, m = _image(), _mask()
    cfg = NoiseConfig(schedule=schedule)
    levels = tuple(range(100, -1, -10))  # falling confidence
    mse = [P.masked_mse(img, a, m) for a in P.perturb_levels_array(img, m, levels, cfg, key="k")]
    assert mse[0] == 0.0
    assert all(b > a for a, b in zip(mse, mse[1:])), mse


def test_vectorised_levels_equal_a_per_level_loop():
    img, m = _image(), _mask()
    for cfg in (NoiseConfig(), NoiseConfig(schedule="linear", noise="global")):
        together = P.perturb_levels_array(img, m, ALL, cfg, key="x")
        for c, arr in zip(ALL, together):
            assert np.array_equal(np.asarray(P.perturb(img, m, c, cfg, key="x")), arr)


def test_levels_are_nested_through_one_shared_eps():
    """Every level is x0 scaled plus the same eps scaled: eps recovered from any level agrees."""
    img, m = _image(), _mask()
    cfg = NoiseConfig()
    levels = (90, 60, 30)
    out = P.perturb_levels_array(img, m, levels, cfg, key="n").astype(np.float64)
    x0 = img.astype(np.float64) / 127.5 - 1
    eps = P.sample_noise(img.shape, cfg.seed, "n").numpy()
    for c, arr in zip(levels, out):
        ab = P.abar(P.level_to_step(c, cfg), cfg)
        expected = np.clip(np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, -1, 1)
        got = arr / 127.5 - 1
        assert np.abs(got - expected)[m].max() <= 1.01 / 127.5  # within one uint8 step (rounding)


def test_global_noise_touches_everything():
    img, m = _image(), _mask()
    out = P.perturb_levels_array(img, m, (0, 100), NoiseConfig(noise="global"), key="g")
    assert (out[0] != img).any(axis=-1).mean() > 0.97
    assert np.array_equal(out[1], img)
    # global takes no mask at all
    assert np.array_equal(P.perturb_levels_array(img, None, (0,), NoiseConfig(noise="global"), key="g")[0], out[0])
    # local and global share eps: inside the mask they agree
    local = P.perturb_levels_array(img, m, (0,), NoiseConfig(), key="g")[0]
    assert np.array_equal(local[m], out[0][m])


def test_deterministic_per_sample_and_different_across_samples_and_seeds():
    img, m = _image(), _mask()
    a = P.perturb_levels_array(img, m, (40,), NoiseConfig(seed=3), key="s1")
    assert np.array_equal(a, P.perturb_levels_array(img, m, (40,), NoiseConfig(seed=3), key="s1"))
    assert not np.array_equal(a, P.perturb_levels_array(img, m, (40,), NoiseConfig(seed=3), key="s2"))
    assert not np.array_equal(a, P.perturb_levels_array(img, m, (40,), NoiseConfig(seed=4), key="s1"))
    # the stable seed is fixed across processes and versions (no salted hash())
    assert P.sample_seed(0, "scene-1") == P.sample_seed(0, "scene-1")
    assert P.sample_seed(0, "abc") == 1000760207710228441


def test_an_empty_mask_is_refused_and_grey_images_are_noised_as_rgb():
    img = _image()
    empty = np.zeros(img.shape[:2], bool)
    for call in (lambda: P.perturb_levels_array(img, empty, (0, 50), key="e"),
                 lambda: P.perturb_levels(img, empty, (0,), key="e"), lambda: P.perturb(img, empty, 40, key="e")):
        with pytest.raises(ValueError, match="mask is empty"):
            call()
    whole = P.perturb_levels_array(img, None, (0,), NoiseConfig(noise="global"), key="e")  # no mask needed
    assert not np.array_equal(whole[0], img)
    grey = img[:, :, 0]
    out = P.perturb_levels_array(grey, _mask(), (0,), key="e")
    assert out.shape == (1,) + img.shape
    assert np.array_equal(P.perturb_levels_array(grey[:, :, None], _mask(), (0,), key="e"), out)


def _rgba():
    rgba = np.dstack([_image(), np.zeros(_image().shape[:2], np.uint8)])
    rgba[:, :32, 3] = 255   # left half opaque
    rgba[:, 32:48, 3] = 128  # then half transparent; the right quarter fully transparent
    return rgba


def test_rgba_pil_images_and_arrays_are_composited_onto_white_alike():
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    rgba = _rgba()
    pil = Image.fromarray(rgba)
    assert pil.mode == "RGBA"
    expected = convert_to_rgb(pil, return_numpy=True)  # transformers' processors' rule
    assert np.array_equal(expected[:, :32], _image()[:, :32])  # opaque: unchanged
    assert (expected[:, 48:] == 255).all()                      # transparent: white, not the stored colour
    assert not np.array_equal(expected[:, 48:], _image()[:, 48:])
    m = _mask()
    from_pil = P.perturb_levels_array(pil, m, (100, 30), key="a")
    from_arr = P.perturb_levels_array(rgba, m, (100, 30), key="a")
    assert np.array_equal(from_pil, from_arr)
    assert np.array_equal(from_pil[0], expected)
    assert np.array_equal(from_pil[1], P.perturb_levels_array(expected, m, (30,), key="a")[0])


def test_show_levels_returns_a_figure():
    import matplotlib

    matplotlib.use("Agg")
    fig = P.show_levels(_image(), _mask(), (100, 40), key="f")
    assert len(fig.axes) == 3
    matplotlib.pyplot.close(fig)


def test_slider_stills_show_every_position_as_the_live_view_would():
    import matplotlib.pyplot as plt

    img, m = _image(), _mask()
    fig = P.slider_stills(img, m, (100, 50, 0), noise_gammas=(0.035, 0.07), key="f")
    assert len(fig.axes) == 6                       # 2 noise_gamma rows x 3 confidence columns
    for r, gamma in enumerate((0.035, 0.07)):
        row = fig.axes[3 * r:3 * r + 3]
        assert [ax.get_title() for ax in row] == ["c = 100%", "c = 50%", "c = 0%"]
        assert row[0].get_ylabel() == f"noise_gamma\n{gamma:g}"
        for ax, c in zip(row, (100, 50, 0)):
            shown = ax.images[0].get_array()
            assert np.array_equal(shown, np.asarray(P.perturb(img, m, c, NoiseConfig(noise_gamma=gamma), key="f")))
    assert np.array_equal(fig.axes[0].images[0].get_array(), img)   # c = 100%: the input
    one_row = P.slider_stills(img, m, key="f")                        # default: every level, config's gamma
    assert [ax.get_title() for ax in one_row.axes] == [f"c = {c}%" for c in range(100, -1, -10)]
    plt.close("all")


def test_levels_that_share_a_step_warn():
    with pytest.warns(UserWarning, match="same step"):
        NoiseConfig(t_max=5)
    NoiseConfig(t_max=10)  # 11 levels, 11 steps: fine
