"""The audio feature extractor's geometry: how many frames a waveform of n samples gives. Shared by the
model (d2v.modalities.audio builds its CNN from CONV_LAYERS) and the data layer (masks and padding are
per frame, and the shortest usable clip is one receptive field), so it lives below both.

Reference: fairseq wav2vec2 ConvFeatureExtractionModel, conv_feature_layers "[(512,10,5)] + [(512,3,2)] * 4
+ [(512,2,2)] * 2".
"""
from __future__ import annotations

# (kernel, stride) of the 7 CNN layers: receptive field 400 samples (25 ms), stride 320 (20 ms)
CONV_LAYERS: tuple[tuple[int, int], ...] = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2
RECEPTIVE_FIELD = 400


def conv_output_length(num_samples: int) -> int:
    """Frames the CNN produces from `num_samples` samples (0 if shorter than one receptive field)."""
    n = num_samples
    for k, s in CONV_LAYERS:
        if n < k:
            return 0
        n = (n - k) // s + 1
    return n


class FeatureLength:
    """Picklable samples -> frames map handed to the data loader (it builds masks per frame)."""

    def __call__(self, num_samples: int) -> int:
        return conv_output_length(num_samples)

    def __repr__(self) -> str:
        return "FeatureLength(stride 320, receptive field 400)"
