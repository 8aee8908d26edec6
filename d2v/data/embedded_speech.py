"""The embedded default speech dataset: isolated spoken words synthesized locally with espeak-ng.

No network is needed: Debian's `espeak-ng` (scripts/setup.sh installs it) speaks 20 words
(SPEECH_WORDS: the digits "zero".."nine" and 10 Speech-Commands-style command words) with
80 "speakers" = 8 English accents (SPEECH_VOICES) x 10 voice variants (SPEECH_VARIANTS: 5 male,
5 female), each speaker with its own speed (-s 120..200 wpm) and pitch (-p 25..75) plus a small
per-utterance jitter, all drawn from numpy RandomState(SPEECH_SEED). espeak-ng writes 22.05 kHz
mono; `d2v.data.audio.load_audio` resamples it to 16 kHz, leading/trailing silence is trimmed
(10 ms frames below -40 dB of the loudest frame, 20/30 ms kept as margin), and the result is
written as 16-bit PCM wav. Prepared once on first use (~30 s: an info log line says what is being
prepared and where it is cached, a progress bar over the utterances goes to stderr):

    <cache>/speech16k/READY                     json stats + recipe fingerprint, written last
    <cache>/speech16k/wav/<speaker>/<word>.wav  1600 utterances (~0.3-0.9 s each)
    <cache>/speech16k/speakers.tsv              speaker, voice, variant, speed, pitch, split
    <cache>/speech16k/train.tsv, test.tsv       word labels; SPEAKER-disjoint split: 64 train
                                                speakers, 16 test speakers (every word in both)
    <cache>/speech16k/train_speaker.tsv, test_speaker.tsv
                                                the same files with the speaker as label (speaker
                                                sets are disjoint: for clustering/retrieval, not
                                                for a classifier)
    <cache>/speech16k/speaker_train.tsv, speaker_test.tsv
                                                speaker-identity probe: all 80 speakers, a
                                                WITHIN-speaker split holding out 4 of the 20 words
                                                (20%) of every speaker; label = speaker

Manifests use the fairseq format read by `d2v.data.audio.read_manifest`: first line "." (the
manifest's folder, so the tree can be moved), then `wav/<speaker>/<word>.wav<TAB>num_samples<TAB>label`.
Preparation is atomic (build in a sibling temp dir, then `os.replace`), idempotent, safe when
processes race, and rebuilt when the recipe fingerprint in READY differs from this module's.

References: espeak-ng(1); Speech Commands (Warden 2018) for the word list.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from d2v.data.audio import load_audio
from d2v.data.common import READY, build_then_rename, read_marker
from d2v.data.embedded import default_cache_dir
from d2v.log import get_logger

__all__ = [
    "SPEECH_WORDS",
    "SPEECH_SAMPLE_RATE",
    "SPEECH_VOICES",
    "SPEECH_VARIANTS",
    "SpeakerSpec",
    "speech_speakers",
    "prepare_speech",
]

SPEECH_DIRNAME = "speech16k"
SPEECH_SAMPLE_RATE = 16000
SPEECH_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
)
# espeak-ng-data/voices (gmw/*) and variants (!v/*) shipped by Debian's espeak-ng package
SPEECH_VOICES: tuple[str, ...] = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd",
    "en-029", "en-us-nyc",
)
SPEECH_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "f4", "f5")
SPEECH_SEED = 0  # numpy RandomState seed of speeds, pitches, jitter and both splits
SPEECH_TEST_SPEAKER_FRACTION = 0.2  # speakers held out by train.tsv/test.tsv
SPEECH_PROBE_TEST_WORDS = 4  # words per speaker held out by speaker_train.tsv/speaker_test.tsv
_RECIPE_VERSION = 1  # bump when the output changes in a way the fingerprint does not capture
_SPEED_RANGE = (120, 200)  # espeak-ng -s, words per minute, per speaker
_PITCH_RANGE = (25, 75)  # espeak-ng -p, 0..99, per speaker
_SPEED_JITTER = 8  # +- per utterance
_PITCH_JITTER = 4  # +- per utterance
_TRIM_FRAME = 160  # 10 ms at 16 kHz
_TRIM_DB = -40.0  # frames below this RMS relative to the loudest frame are silence
_TRIM_MARGIN = (2, 3)  # frames kept before the first / after the last voiced frame
_THREADS = 2
log = get_logger(__name__)
_MISSING_ESPEAK = ("embedded_speech: espeak-ng not found: install it with `apt-get install espeak-ng` "
                   "(scripts/setup.sh does this), or set data.path to your own audio manifest/folder")


class SpeakerSpec(NamedTuple):
    name: str  # directory name, e.g. "en-gb-scotland_f3"
    voice: str  # espeak-ng voice
    variant: str  # espeak-ng variant (appended as voice+variant)
    speed: int  # -s, words per minute
    pitch: int  # -p, 0..99
    split: str  # "train" or "test" (speaker-disjoint word task)


def speech_speakers() -> list[SpeakerSpec]:
    """The 80 speakers, in a fixed order, with their speed/pitch and train/test split."""
    rs = np.random.RandomState(SPEECH_SEED)
    combos = [(v, var) for v in SPEECH_VOICES for var in SPEECH_VARIANTS]
    speeds = rs.randint(_SPEED_RANGE[0], _SPEED_RANGE[1] + 1, size=len(combos))
    pitches = rs.randint(_PITCH_RANGE[0], _PITCH_RANGE[1] + 1, size=len(combos))
    n_test = int(round(len(combos) * SPEECH_TEST_SPEAKER_FRACTION))
    test = set(rs.permutation(len(combos))[:n_test].tolist())
    return [SpeakerSpec(f"{v}_{var}", v, var, int(speeds[k]), int(pitches[k]),
                        "test" if k in test else "train")
            for k, (v, var) in enumerate(combos)]


def _utterance_jitter() -> np.ndarray:
    """(speakers, words, 2) int: per-utterance speed and pitch offsets."""
    rs = np.random.RandomState(SPEECH_SEED + 1)
    n = len(SPEECH_VOICES) * len(SPEECH_VARIANTS)
    speed = rs.randint(-_SPEED_JITTER, _SPEED_JITTER + 1, size=(n, len(SPEECH_WORDS)))
    pitch = rs.randint(-_PITCH_JITTER, _PITCH_JITTER + 1, size=(n, len(SPEECH_WORDS)))
    return np.stack([speed, pitch], axis=-1)


def _probe_test_words() -> np.ndarray:
    """(speakers, SPEECH_PROBE_TEST_WORDS) word indices held out per speaker for the speaker probe."""
    rs = np.random.RandomState(SPEECH_SEED + 2)
    n = len(SPEECH_VOICES) * len(SPEECH_VARIANTS)
    return np.stack([rs.permutation(len(SPEECH_WORDS))[:SPEECH_PROBE_TEST_WORDS] for _ in range(n)])


def _fingerprint() -> str:
    recipe = (_RECIPE_VERSION, SPEECH_SAMPLE_RATE, SPEECH_WORDS, speech_speakers(),
              _utterance_jitter().tolist(), _probe_test_words().tolist(), _TRIM_FRAME, _TRIM_DB,
              _TRIM_MARGIN)
    return hashlib.blake2b(repr(recipe).encode(), digest_size=12).hexdigest()


def _trim_silence(x: np.ndarray) -> np.ndarray:
    """Cut leading/trailing 10 ms frames quieter than _TRIM_DB relative to the loudest frame."""
    n = len(x) // _TRIM_FRAME
    if n == 0:
        return x
    rms = np.sqrt((x[: n * _TRIM_FRAME].astype(np.float64).reshape(n, _TRIM_FRAME) ** 2).mean(1))  # (n,)
    if rms.max() <= 0:
        return x
    voiced = np.flatnonzero(20 * np.log10(rms / rms.max() + 1e-12) > _TRIM_DB)
    lo = max(0, voiced[0] - _TRIM_MARGIN[0]) * _TRIM_FRAME
    hi = min(len(x), (voiced[-1] + 1 + _TRIM_MARGIN[1]) * _TRIM_FRAME)
    return x[lo:hi]


def _synthesize(espeak: str, spk: SpeakerSpec, word: str, speed: int, pitch: int, raw: Path,
                out: Path) -> int:
    """espeak-ng one word to `raw` (22.05 kHz), resample + trim, write 16 kHz PCM_16 `out`."""
    import soundfile as sf

    cmd = [espeak, "-v", f"{spk.voice}+{spk.variant}", "-s", str(speed), "-p", str(pitch),
           "-w", str(raw), word]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not raw.is_file():
        raise RuntimeError(f"embedded_speech: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()}")
    x = _trim_silence(load_audio(raw, SPEECH_SAMPLE_RATE))
    raw.unlink()
    peak = float(np.abs(x).max())
    if peak > 0.99:  # keep 16-bit PCM from clipping (espeak output peaks well below this)
        x = x * (0.99 / peak)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), x, SPEECH_SAMPLE_RATE, subtype="PCM_16")
    return int(len(x))


def _write_manifest(path: Path, rows: list[tuple[str, int, str]]) -> None:
    lines = ["."] + [f"{rel}\t{n}\t{label}" for rel, n, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_speech_tree(tmp_root: Path, espeak: str) -> dict:
    """Synthesize every utterance and write the manifests under `tmp_root`; return the stats."""
    speakers = speech_speakers()
    jitter = _utterance_jitter()  # (S, W, 2)
    raw_dir = tmp_root / ".raw"
    raw_dir.mkdir()
    jobs = []
    for s, spk in enumerate(speakers):
        for w, word in enumerate(SPEECH_WORDS):
            speed = int(np.clip(spk.speed + jitter[s, w, 0], 80, 450))
            pitch = int(np.clip(spk.pitch + jitter[s, w, 1], 0, 99))
            rel = f"wav/{spk.name}/{word}.wav"
            jobs.append((s, w, rel, speed, pitch))

    def run(job):
        s, w, rel, speed, pitch = job
        return _synthesize(espeak, speakers[s], SPEECH_WORDS[w], speed, pitch,
                           raw_dir / f"{s:03d}_{w:02d}.wav", tmp_root / rel)

    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        done = tqdm(pool.map(run, jobs), total=len(jobs), desc="synthesizing speech", unit="utt",
                    file=sys.stderr, mininterval=1.0, leave=False)
        lengths = list(done)
    raw_dir.rmdir()

    held_out = _probe_test_words()  # (S, k)
    splits: dict[str, list[tuple[str, int, str]]] = {
        name: [] for name in ("train", "test", "train_speaker", "test_speaker", "speaker_train",
                              "speaker_test")}
    for (s, w, rel, _, _), n in zip(jobs, lengths):
        spk = speakers[s]
        splits[spk.split].append((rel, n, SPEECH_WORDS[w]))
        splits[f"{spk.split}_speaker"].append((rel, n, spk.name))
        probe = "speaker_test" if w in held_out[s] else "speaker_train"
        splits[probe].append((rel, n, spk.name))
    for name, rows in splits.items():
        _write_manifest(tmp_root / f"{name}.tsv", rows)
    table = ["speaker\tvoice\tvariant\tspeed\tpitch\tsplit"]
    table += ["\t".join(map(str, spk)) for spk in speakers]
    (tmp_root / "speakers.tsv").write_text("\n".join(table) + "\n", encoding="utf-8")
    secs = np.asarray(lengths, dtype=np.float64) / SPEECH_SAMPLE_RATE
    return {
        "utterances": len(lengths),
        "speakers": len(speakers),
        "words": len(SPEECH_WORDS),
        "train_speakers": sum(spk.split == "train" for spk in speakers),
        "test_speakers": sum(spk.split == "test" for spk in speakers),
        "counts": {name: len(rows) for name, rows in splits.items()},
        "seconds_total": round(float(secs.sum()), 2),
        "seconds_min": round(float(secs.min()), 3),
        "seconds_max": round(float(secs.max()), 3),
        "sample_rate": SPEECH_SAMPLE_RATE,
    }


def _ready_fingerprint(root: Path) -> str | None:
    return (read_marker(root) or {}).get("fingerprint")


def prepare_speech(cache_dir: Path | str | None = None) -> Path:
    """Build `<cache_dir>/speech16k` once (see module docstring) and return that root.

    Returns at once if READY exists with this recipe's fingerprint. Otherwise the tree is built in
    a sibling temp dir (READY written last) and renamed into place; a tree with an older
    fingerprint is moved aside and deleted; if another process finished first, ours is discarded.
    A speech16k dir without READY (not ours, or damaged) is refused, never overwritten."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / SPEECH_DIRNAME
    want = _fingerprint()
    if _ready_fingerprint(final) == want:
        return final
    if final.exists() and not (final / READY).is_file():
        raise RuntimeError(f"embedded_speech: {final} exists but has no {READY} marker (not written "
                           f"by prepare_speech, or damaged); delete it and call prepare_speech again")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError(_MISSING_ESPEAK)
    n = len(SPEECH_VOICES) * len(SPEECH_VARIANTS) * len(SPEECH_WORDS)
    log.info("preparing the embedded speech dataset (first use only, ~30 s): synthesizing %d spoken "
             "words with espeak-ng, cached in %s", n, final)
    t0 = time.perf_counter()
    # a tree of an older recipe (another fingerprint) is replaced
    build_then_rename(final, lambda tmp: {"fingerprint": want, **_write_speech_tree(tmp, espeak)},
                      is_complete=lambda root: _ready_fingerprint(root) == want)
    log.info("embedded speech dataset ready in %.0f s: %s", time.perf_counter() - t0, final)
    return final
