"""The synthetic sound generator: reproducible, well-formed, and each class what its name says."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.commands.synthetic import CLASS_NAMES, LabeledClip, generate_clip, iter_dataset

SR = 16000
CLIPS_PER_CHECK = 6  # per class and property: enough to meet the random parameter ranges' ends


def clips(label: str, seed: int = 0, duration_s: float | None = 4.0, count: int = CLIPS_PER_CHECK):
    rng = np.random.default_rng(seed)
    return [generate_clip(label, rng, SR, duration_s) for _ in range(count)]


def rms_dbfs(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20)


def power_spectrum(x: np.ndarray, frame: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Welch-style mean power spectrum: (frequencies in Hz, power).

    Blackman's sidelobes (< -58 dB) keep a pure tone from showing extra peaks."""
    window = np.blackman(frame)
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), frame)[:: frame // 2]
    power = np.mean(np.abs(np.fft.rfft(frames * window, axis=1)) ** 2, axis=0)
    return np.fft.rfftfreq(frame, 1 / SR), power


def spectral_peaks(x: np.ndarray, relative: float = 0.01) -> np.ndarray:
    """Frequencies of local maxima above `relative` of the strongest one."""
    freqs, power = power_spectrum(x)
    inner = power[1:-1]
    is_peak = (inner > power[:-2]) & (inner >= power[2:]) & (inner > relative * power.max())
    return freqs[1:-1][is_peak]


def frame_power_db(x: np.ndarray, frame_s: float = 0.01) -> np.ndarray:
    frame = int(frame_s * SR)
    frames = x[: len(x) // frame * frame].astype(np.float64).reshape(-1, frame)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


def test_class_names_are_audioset_display_names():
    # Spelled as in AudioSet's 527-class ontology (class_labels_indices.csv), so that the bundled
    # model's labels mean what an AudioSet model's labels mean.
    audioset = {
        "Silence", "Sine wave", "Harmonic", "Chirp tone", "Beep, bleep", "Clicking",
        "White noise", "Pink noise", "Static", "Mains hum",
    }  # fmt: skip
    assert set(CLASS_NAMES) == audioset and len(CLASS_NAMES) == len(audioset)


def test_same_seed_gives_the_same_clip_and_another_seed_another():
    for label in CLASS_NAMES:
        first = generate_clip(label, np.random.default_rng(7))
        again = generate_clip(label, np.random.default_rng(7))
        other = generate_clip(label, np.random.default_rng(8))
        assert np.array_equal(first, again), label
        assert first.shape != other.shape or not np.array_equal(first, other), label


def test_dataset_is_balanced_reproducible_and_independent_of_what_came_before():
    a = list(iter_dataset(2, seed=3, duration_s=1.0))
    b = list(iter_dataset(2, seed=3, duration_s=1.0))
    assert [clip.label for clip in a] == [clip.label for clip in b]
    assert all(np.array_equal(x.waveform, y.waveform) for x, y in zip(a, b, strict=True))
    assert sorted(clip.label for clip in a) == sorted(CLASS_NAMES * 2)
    assert [clip.index for clip in a] == list(range(len(a)))
    assert all(isinstance(clip, LabeledClip) for clip in a)
    other = list(iter_dataset(2, seed=4, duration_s=1.0))
    assert not all(np.array_equal(x.waveform, y.waveform) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("sample_rate", [16000, 22050, 44100])
def test_clips_are_float32_mono_of_the_asked_length(sample_rate):
    rng = np.random.default_rng(0)
    for label in CLASS_NAMES:
        clip = generate_clip(label, rng, sample_rate, duration_s=1.5)
        assert clip.dtype == np.float32 and clip.ndim == 1
        assert clip.shape == (round(1.5 * sample_rate),)
        assert np.isfinite(clip).all()


def test_random_durations_span_one_window():
    rng = np.random.default_rng(0)
    durations = [len(generate_clip("Sine wave", rng)) / SR for _ in range(40)]
    assert 1.0 <= min(durations) < 3.0 and 8.0 < max(durations) <= 10.24


def test_silence_is_at_least_15_db_below_every_sound_and_nothing_clips():
    silences = [rms_dbfs(x) for x in clips("Silence", count=20)]
    assert max(silences) <= -60.0
    for label in CLASS_NAMES:
        if label == "Silence":
            continue
        for clip in clips(label, count=10):
            assert rms_dbfs(clip) >= -60.0 + 15.0, label
            assert np.abs(clip).max() <= 0.9 + 1e-6, label


def test_sine_wave_has_one_partial_and_harmonic_several():
    for sine in clips("Sine wave"):
        assert len(spectral_peaks(sine)) == 1
    for chord in clips("Harmonic"):
        assert len(spectral_peaks(chord)) >= 3


def test_mains_hum_is_built_on_50_or_60_hz():
    for hum in clips("Mains hum"):
        peaks = spectral_peaks(hum)
        assert min(abs(peaks[0] - 50.0), abs(peaks[0] - 60.0)) < 4.0, peaks[:3]
        freqs, power = power_spectrum(hum)
        assert power[freqs < 1200].sum() > 0.9 * power.sum()


def test_chirp_tone_sweeps_an_octave_while_a_sine_wave_holds_its_pitch():
    def pitch_track(x: np.ndarray) -> np.ndarray:
        frames = np.lib.stride_tricks.sliding_window_view(x, 1024)[::512] * np.hanning(1024)
        return np.fft.rfftfreq(1024, 1 / SR)[np.abs(np.fft.rfft(frames, axis=1)).argmax(axis=1)]

    for chirp in clips("Chirp tone"):
        track = pitch_track(chirp)
        assert track.max() / max(track.min(), 1.0) >= 1.8
    for sine in clips("Sine wave"):
        track = pitch_track(sine)
        assert track.max() / track.min() < 1.1


def test_beeps_switch_on_and_off_while_tones_stay_steady():
    for beep in clips("Beep, bleep", duration_s=1.0):
        power = frame_power_db(beep)
        assert np.percentile(power, 99) - np.percentile(power, 10) > 10.0
    # (Chords can beat, so "Harmonic" is left out; 50 ms frames hold several periods of 100 Hz.)
    for tone in clips("Sine wave") + clips("Mains hum"):
        power = frame_power_db(tone, frame_s=0.05)
        assert np.percentile(power, 99) - np.percentile(power, 10) < 3.0


def test_white_noise_is_flat_and_pink_noise_falls_3_db_per_octave():
    def slope(x: np.ndarray) -> float:
        """Fitted exponent of power ~ f**slope between 100 Hz and 6 kHz: 0 white, -1 pink."""
        freqs, power = power_spectrum(x)
        band = (freqs > 100) & (freqs < 6000)
        return float(np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)[0])

    for white in clips("White noise"):
        assert abs(slope(white)) < 0.25
    for pink in clips("Pink noise"):
        assert -1.25 < slope(pink) < -0.75


def test_clicking_is_a_regular_train_while_static_crackles_at_random():
    def onsets(x: np.ndarray) -> np.ndarray:
        """Times (s) where 2 ms energy rises above a tenth of its maximum, 25 ms apart at least."""
        frame = int(0.002 * SR)
        energy = (
            np.square(x[: len(x) // frame * frame].astype(np.float64)).reshape(-1, frame).sum(1)
        )
        loud = np.flatnonzero(energy > 0.1 * energy.max())
        starts = loud[np.insert(np.diff(loud) * 0.002 >= 0.025, 0, True)]
        return starts * 0.002

    for clicking in clips("Clicking", duration_s=3.0):
        intervals = np.diff(onsets(clicking))
        assert len(intervals) >= 2
        # Jitter is 5 % of the interval; a missed weak click would double one interval.
        assert np.median(np.abs(intervals - np.median(intervals))) < 0.15 * np.median(intervals)
    for static in clips("Static"):
        x = static.astype(np.float64)
        kurtosis = np.mean(x**4) / np.mean(x**2) ** 2
        assert kurtosis > 6.0  # impulsive; Gaussian (white) noise has 3
    for white in clips("White noise"):
        x = white.astype(np.float64)
        assert np.mean(x**4) / np.mean(x**2) ** 2 < 3.5


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="unknown synthetic class"):
        generate_clip("Speech", np.random.default_rng(0))
