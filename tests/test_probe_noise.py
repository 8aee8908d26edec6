"""The probe prints its noise: a standard error beside every accuracy and gain, and the chance level.

Run: .venv/bin/python -m pytest -q tests/test_probe_noise.py
"""
import math

import numpy as np

from d2v.probe import accuracy_se, format_probe


def test_accuracy_se_is_the_binomial_standard_error():
    assert math.isclose(accuracy_se(50.0, 400), 2.5)  # sqrt(.25 / 400) = 0.025
    assert math.isclose(accuracy_se(90.0, 100), 3.0)
    assert accuracy_se(100.0, 50) == 0.0
    rng = np.random.default_rng(0)  # and it is what repeated test sets scatter by
    accs = [100.0 * rng.binomial(300, 0.4) / 300 for _ in range(4000)]
    assert abs(np.std(accs) - accuracy_se(40.0, 300)) < 0.05 * accuracy_se(40.0, 300)


def test_format_shows_standard_errors_chance_and_gain_in_se():
    enc = lambda a, b: {"full": a, "10shot": b, "full_se": accuracy_se(a, 320),  # noqa: E731
                        "10shot_se": accuracy_se(b, 320)}
    r = {"pretrained": enc(56.2, 40.6), "teacher": enc(56.0, 38.8), "random_init": enc(50.0, 32.2),
         "n_train": 960, "n_test": 320, "classes": 20, "chance": 5.0,
         "gain_full": 6.2, "gain_10shot": 8.4,
         "gain_full_se": math.hypot(accuracy_se(56.2, 320), accuracy_se(50.0, 320)),
         "gain_10shot_se": math.hypot(accuracy_se(40.6, 320), accuracy_se(32.2, 320))}
    text = format_probe({"shots": 10, "pool": "mean", "step": 1500, "tasks": {"word": r}})
    assert "56.2% ±2.8" in text and "32.2% ±2.6" in text
    assert "chance (always the most common held-out class): 5.0%" in text
    assert "10shot +8.4 ±3.8 pts (+2.2 SE)" in text
