"""Labeled synthetic audio for a handful of AudioSet classes that numpy can honestly produce.

Used to train the bundled default model (scripts/train_default_model.py) and to build the demo
corpus (demo.py). Every class name is an AudioSet display name, spelled exactly as in the
527-class ontology, so the default model's labels read the same as a real AudioSet model's. The
NOVEL_CLASS_NAMES are classes the bundled model never saw: the demo trains a head on them.

Each clip draws its parameters (frequencies, rates, level, duration) from the generator it is
given, and is mixed with a quiet "room tone" of random colour at a random SNR: the task is not
trivial, but each class differs from every other in a way a spectrogram shows (one partial vs.
several, steady vs. sweeping vs. interrupted, flat vs. 1/f spectrum, regular clicks vs. random
crackle, level).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ast_model.config import FbankConfig

SAMPLE_RATE = 16000
MIN_DURATION_S = 1.0
MAX_DURATION_S = FbankConfig().input_seconds  # one AST window (1024 fbank frames, 10.24 s)

# Every signal stays below this, so resampling 44.1 kHz clips to 16 kHz keeps the whole class cue.
_MAX_TONE_HZ = 7000.0

# Levels in dBFS. Sounds are at least 20 dB above the loudest "Silence", which is what separates the
# two for a listener too (near-silence is room tone, not nothing).
_SOUND_RMS_DBFS = (-40.0, -12.0)
_SILENCE_RMS_DBFS = (-90.0, -60.0)
_ROOM_TONE_SNR_DB = (15.0, 40.0)
_MAX_PEAK = 0.9
_LOWEST_HZ = 20.0  # fbank's lowest mel band starts here

CLASS_NAMES: tuple[str, ...] = (
    "Silence",
    "Sine wave",
    "Harmonic",
    "Chirp tone",
    "Beep, bleep",
    "Clicking",
    "White noise",
    "Pink noise",
    "Static",
    "Mains hum",
)


def _db_to_amplitude(db: float) -> float:
    return float(10.0 ** (db / 20.0))


def _rms(signal: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(signal, dtype=np.float64))))


def _scale_to_rms(signal: np.ndarray, rms_dbfs: float) -> np.ndarray:
    current = _rms(signal)
    if current == 0.0:
        return signal
    return signal * (_db_to_amplitude(rms_dbfs) / current)


def _colored_noise(
    num_samples: int, exponent: float, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """Gaussian noise with power spectral density ~ 1/f**exponent (0 white, 1 pink, 2 brown).

    The density is flat below 20 Hz: 1/f down to DC would put most of a brown (and half of a pink)
    noise's power into inaudible drift, and the level into what nobody hears.
    """
    # Shaped in a power-of-two FFT and cut to length: odd lengths (prime factors) make FFTs slow.
    fft_len = 1 << max(1, (num_samples - 1).bit_length())
    spectrum = np.fft.rfft(rng.standard_normal(fft_len))
    freqs_hz = np.maximum(np.fft.rfftfreq(fft_len, d=1.0 / sample_rate), _LOWEST_HZ)
    spectrum *= freqs_hz ** (-exponent / 2.0)
    noise = np.fft.irfft(spectrum, n=fft_len)[:num_samples]
    return noise / max(_rms(noise), 1e-12)


def _time(num_samples: int, sample_rate: int) -> np.ndarray:
    return np.arange(num_samples, dtype=np.float64) / sample_rate


def _ramp(num_samples: int, sample_rate: int, ramp_s: float = 0.005) -> np.ndarray:
    """A raised-cosine fade in and out, so tone bursts start like real beeps, not like clicks."""
    envelope = np.ones(num_samples)
    ramp = min(int(ramp_s * sample_rate), num_samples // 2)
    if ramp > 0:
        fade = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        envelope[:ramp] = fade
        envelope[-ramp:] = fade[::-1]
    return envelope


def _sine_wave(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    freq = np.exp(rng.uniform(np.log(100.0), np.log(_MAX_TONE_HZ)))
    return np.sin(2 * np.pi * freq * _time(n, sr) + rng.uniform(0, 2 * np.pi))


def _harmonic_tone(
    f0: float, n: int, sr: int, rng: np.random.Generator, max_hz: float
) -> np.ndarray:
    """A harmonic complex: partials at integer multiples of f0 with a random spectral tilt."""
    t = _time(n, sr)
    tilt = rng.uniform(0.5, 1.5)
    count = int(min(rng.integers(3, 11), max_hz // f0))
    tone = np.zeros(n)
    for k in range(1, count + 1):
        tone += k ** (-tilt) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return tone


def _harmonic(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    # One to three harmonic tones at once (a chord); f0 >= 150 Hz keeps them apart from mains hum.
    notes = int(rng.integers(1, 4))
    chord = np.zeros(n)
    for _ in range(notes):
        f0 = np.exp(rng.uniform(np.log(150.0), np.log(1000.0)))
        chord += _harmonic_tone(f0, n, sr, rng, max_hz=_MAX_TONE_HZ)
    return chord


def _chirp_tone(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Repeated sweeps of at least an octave, up or down, linear or exponential in frequency."""
    low = np.exp(rng.uniform(np.log(100.0), np.log(_MAX_TONE_HZ / 2)))
    high = np.exp(rng.uniform(np.log(2 * low), np.log(_MAX_TONE_HZ)))
    start, end = (low, high) if rng.random() < 0.5 else (high, low)
    sweep_s = rng.uniform(0.3, 3.0)
    phase_in_sweep = (_time(n, sr) + rng.uniform(0, sweep_s)) % sweep_s / sweep_s  # 0..1 sawtooth
    if rng.random() < 0.5:
        freq = start + (end - start) * phase_in_sweep
    else:
        freq = start * (end / start) ** phase_in_sweep
    # Integrating the instantaneous frequency keeps the phase continuous within each sweep.
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _beep(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Tone bursts of 50-400 ms with gaps; periods <= 0.8 s put a beep and a gap in any 1 s clip."""
    period_s = rng.uniform(0.15, 0.8)
    on_s = rng.uniform(0.05, min(0.4, 0.6 * period_s))
    freq = np.exp(rng.uniform(np.log(400.0), np.log(4000.0)))
    t = _time(n, sr)
    phase_in_period = (t + rng.uniform(0, period_s)) % period_s
    gate = (phase_in_period < on_s).astype(np.float64)
    # Smooth the gate's edges (5 ms) so each burst is a beep, not a pair of clicks.
    kernel = _ramp(int(0.01 * sr), sr)
    gate = np.convolve(gate, kernel / kernel.sum(), mode="same")
    return gate * np.sin(2 * np.pi * freq * t)


def _clicking(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A regular train (1-20 per second, small jitter) of 1-5 ms broadband clicks."""
    rate = rng.uniform(1.0, 20.0)
    interval = sr / rate
    onsets = np.arange(rng.uniform(0, interval), n, interval)
    onsets = onsets + rng.normal(0, 0.05 * interval, size=onsets.shape)
    click_len = int(rng.uniform(0.001, 0.005) * sr)
    decay = np.exp(-np.arange(click_len) / (click_len / 5.0))
    clicks = np.zeros(n)
    for onset in onsets.astype(np.int64):
        if 0 <= onset < n:
            stop = min(n, onset + click_len)
            clicks[onset:stop] += rng.standard_normal(stop - onset) * decay[: stop - onset]
    return clicks


def _static(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Crackle: random (Poisson) impulses, 50-800 per second, heavy-tailed amplitudes, over hiss."""
    rate = rng.uniform(50.0, 800.0)
    count = rng.poisson(rate * n / sr)
    impulses = np.zeros(n)
    positions = rng.integers(0, n, size=count)
    np.add.at(impulses, positions, rng.lognormal(0.0, 1.0, size=count) * rng.choice([-1, 1], count))
    # A short, random resonance per clip turns impulses into crackles rather than ideal clicks.
    kernel = rng.standard_normal(int(0.0005 * sr) + 1) * np.exp(
        -np.arange(int(0.0005 * sr) + 1) / 3
    )
    crackle = np.convolve(impulses, kernel, mode="same")
    crackle /= max(_rms(crackle), 1e-12)
    hiss = _colored_noise(n, 0.0, rng, sr) * _db_to_amplitude(rng.uniform(-30.0, -15.0))
    return crackle + hiss


def _mains_hum(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """50 or 60 Hz and its harmonics up to ~1 kHz, odd ones emphasised (a transformer's buzz)."""
    mains = float(rng.choice([50.0, 60.0])) + rng.uniform(-0.5, 0.5)
    t = _time(n, sr)
    hum = np.zeros(n)
    for k in range(1, int(rng.integers(4, 20)) + 1):
        weight = (1.0 if k % 2 else rng.uniform(0.1, 0.5)) * k ** (-rng.uniform(0.3, 1.2))
        hum += weight * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
    return hum


_GENERATORS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "Sine wave": _sine_wave,
    "Harmonic": _harmonic,
    "Chirp tone": _chirp_tone,
    "Beep, bleep": _beep,
    "Clicking": _clicking,
    "White noise": lambda n, sr, rng: _colored_noise(n, 0.0, rng, sr),
    "Pink noise": lambda n, sr, rng: _colored_noise(n, 1.0, rng, sr),
    "Static": _static,
    "Mains hum": _mains_hum,
}
assert set(_GENERATORS) | {"Silence"} == set(CLASS_NAMES)


def _siren(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A tone whose pitch swings up and down, smoothly, 0.3-3 times a second (an ambulance)."""
    centre = np.exp(rng.uniform(np.log(500.0), np.log(1500.0)))
    depth = rng.uniform(0.2, 0.45) * centre
    rate = rng.uniform(0.3, 3.0)
    t = _time(n, sr)
    freq = centre + depth * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _doorbell(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Ding-dong: two decaying bell tones a third or fourth apart, repeated every 1-3 s."""
    high = np.exp(rng.uniform(np.log(600.0), np.log(1400.0)))
    low = high / float(rng.choice([1.26, 1.33, 1.5]))
    period = int(rng.uniform(1.0, 3.0) * sr)
    note = int(0.45 * period)
    decay = np.exp(-np.arange(note) / (0.25 * note))
    bell = np.zeros(n)
    start = int(rng.uniform(0, period))
    for onset in range(start - period, n, period):
        for freq, offset in ((high, 0), (low, note)):
            begin = onset + offset
            idx = np.arange(max(begin, 0), min(begin + note, n))
            bell[idx] += decay[idx - begin] * np.sin(2 * np.pi * freq * (idx - begin) / sr)
    return bell


def _engine(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A low rumble: harmonics of a 25-70 Hz firing rate, throbbing, over brown noise."""
    f0 = rng.uniform(25.0, 70.0)
    t = _time(n, sr)
    throb = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4.0) * t)
    rumble = sum(
        k**-0.8 * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.3)) for k in range(1, 12)
    )
    return throb * rumble + 0.3 * _colored_noise(n, 2.0, rng, sr)


# Classes the bundled model was never trained on: the demo's examples for a head of one's own.
NOVEL_GENERATORS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "Siren": _siren,
    "Doorbell": _doorbell,
    "Engine": _engine,
}
NOVEL_CLASS_NAMES: tuple[str, ...] = tuple(NOVEL_GENERATORS)


def _room_tone(n: int, rng: np.random.Generator, sample_rate: int) -> np.ndarray:
    """Unit-RMS background of random colour: white, pink or brown."""
    return _colored_noise(n, float(rng.choice([0.0, 1.0, 2.0])), rng, sample_rate)


def generate_clip(
    label: str,
    rng: np.random.Generator,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float | None = None,
) -> np.ndarray:
    """One mono clip of class `label`: float32 in [-1, 1], shape (round(duration_s * sample_rate),).

    `duration_s=None` draws a duration uniformly in [1, 10.24] s. The same generator state and
    arguments give the same clip. Tones stay below 7 kHz at any sample rate (noises span the band),
    so a clip made at 44.1 kHz and resampled to 16 kHz keeps what defines its class.
    """
    generators = {**_GENERATORS, **NOVEL_GENERATORS}
    if label not in CLASS_NAMES and label not in generators:
        known = ", ".join((*CLASS_NAMES, *NOVEL_CLASS_NAMES))
        raise ValueError(f"unknown synthetic class {label!r}; known: {known}")
    if duration_s is None:
        duration_s = float(rng.uniform(MIN_DURATION_S, MAX_DURATION_S))
    n = max(1, int(round(duration_s * sample_rate)))
    if label == "Silence":
        # Near-silence is faint room tone; one in five is digital silence (all zeros).
        if rng.random() < 0.2:
            return np.zeros(n, dtype=np.float32)
        clip = _scale_to_rms(_room_tone(n, rng, sample_rate), rng.uniform(*_SILENCE_RMS_DBFS))
    else:
        level_db = rng.uniform(*_SOUND_RMS_DBFS)
        signal = _scale_to_rms(generators[label](n, sample_rate, rng), level_db)
        snr_db = rng.uniform(*_ROOM_TONE_SNR_DB)
        clip = signal + _scale_to_rms(_room_tone(n, rng, sample_rate), level_db - snr_db)
        # Sparse sounds (clicks, crackle) reach full scale at an RMS level: turn the whole clip down
        # rather than clip it, so a click stays a click.
        peak = float(np.max(np.abs(clip)))
        if peak > _MAX_PEAK:
            clip *= _MAX_PEAK / peak
    return clip.astype(np.float32)


@dataclass(frozen=True)
class LabeledClip:
    index: int
    label: str
    waveform: np.ndarray  # (N,) float32 mono at the dataset's sample rate


def iter_dataset(
    clips_per_class: int,
    seed: int,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float | None = None,
) -> Iterator[LabeledClip]:
    """Class-balanced clips in a seeded, shuffled order.

    Each clip gets its own child seed (SeedSequence.spawn), so clip i is the same whether or not
    the clips before it were generated, and two seeds give independent datasets.
    """
    root = np.random.SeedSequence(seed)
    labels = [name for name in CLASS_NAMES for _ in range(clips_per_class)]
    order = np.random.default_rng(root.spawn(1)[0]).permutation(len(labels))
    children = root.spawn(len(labels))
    for index, (label_index, child) in enumerate(zip(order, children, strict=True)):
        label = labels[label_index]
        rng = np.random.default_rng(child)
        yield LabeledClip(index, label, generate_clip(label, rng, sample_rate, duration_s))
