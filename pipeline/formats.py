"""The audio formats ast-label accepts: one table, read by the unit reader and by the decoder.

Reading a unit (`pipeline.labeling.members`) takes a tar member as a sample's audio when its
extension is here; decoding (`pipeline.audio`) tries the extension's decoders in order. Data whose
extension is not here (or that has none, as `ast-label predict` may pass) is sniffed: libsndfile,
then FFmpeg.
"""

from __future__ import annotations

LIBSNDFILE = "libsndfile"  # soundfile: exact frame counts, no FFmpeg needed
FFMPEG = "ffmpeg"  # PyAV (`av`), whose wheel ships its own FFmpeg libraries

# extension -> the decoders to try, in order. The second decoder gets a try only when the first
# cannot open the bytes at all; a file that opens and then fails (truncated, NaN, too long)
# keeps the first decoder's reason.
AUDIO_FORMATS: dict[str, tuple[str, ...]] = {
    "wav": (LIBSNDFILE,),  # PCM 8/16/24/32-bit, float, a-law/µ-law, ADPCM, MP3-in-WAV; RF64
    "flac": (LIBSNDFILE,),
    "mp3": (LIBSNDFILE,),
    # Ogg carries codecs libsndfile does not read (FLAC-in-Ogg, Speex): FFmpeg second.
    "ogg": (LIBSNDFILE, FFMPEG),
    "oga": (LIBSNDFILE, FFMPEG),
    "opus": (LIBSNDFILE, FFMPEG),
    "aif": (LIBSNDFILE,),
    "aiff": (LIBSNDFILE,),
    "aifc": (LIBSNDFILE,),  # AIFF-C: a-law, µ-law, float
    "au": (LIBSNDFILE,),
    "caf": (LIBSNDFILE,),  # Core Audio Format, ALAC included
    "w64": (LIBSNDFILE,),  # Sony Wave64
    "sph": (LIBSNDFILE,),  # NIST SPHERE (LDC speech corpora), uncompressed
    # What YouTube-sourced sets (AudioSet, VGGSound) and phones store: AAC in MP4, Opus or
    # Vorbis in WebM / Matroska. mp4 and mkv may be videos: their first audio stream is used.
    "m4a": (FFMPEG,),
    "mp4": (FFMPEG,),
    "aac": (FFMPEG,),  # raw ADTS
    "webm": (FFMPEG,),
    "mka": (FFMPEG,),
    "mkv": (FFMPEG,),
    "wma": (FFMPEG,),
}
AUDIO_EXTENSIONS = tuple(AUDIO_FORMATS)
SNIFF_DECODERS = (LIBSNDFILE, FFMPEG)  # for an unknown or missing extension


def extension_of(name: str) -> str | None:
    """A file name's last extension, lower-case ("x.seg.M4A" -> "m4a"), audio or not; else None."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    return base.rsplit(".", 1)[1].lower() or None


def audio_format_of(name: str) -> str | None:
    """The audio format named by a file name's last extension ("x.seg.M4A" -> "m4a"), else None."""
    extension = extension_of(name)
    return extension if extension in AUDIO_FORMATS else None


def decoders_for(audio_format: str | None) -> tuple[str, ...]:
    """The decoders to try for a format (an extension, any case, with or without its dot)."""
    if not audio_format:
        return SNIFF_DECODERS
    return AUDIO_FORMATS.get(audio_format.lower().lstrip("."), SNIFF_DECODERS)
