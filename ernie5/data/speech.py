"""Speech synthesis for the demo data: espeak-ng through ctypes, from the `espeakng-loader` wheel (it ships
libespeak-ng and its voice data, so nothing is fetched at run time).

If the library cannot be loaded, `Speaker(fallback=True)` produces a clearly labelled *synthetic tone code*
instead (one fixed chord per digit word); `Speaker.engine` says which one is in use.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from ernie5.errors import UserError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_espeakCHARS_UTF8 = 1
_espeakRATE, _espeakPITCH = 1, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_LIB = None  # espeak keeps global state: one initialisation per process


def _load():
    global _LIB
    if _LIB is not None:
        return _LIB
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
    if rate <= 0:
        raise OSError(f"espeak_Initialize returned {rate}")
    lib._ernie5_rate = rate
    lib._ernie5_chunks = []

    def collect(wav, n, _events):
        if n > 0:
            lib._ernie5_chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    lib._ernie5_cb = _CALLBACK(collect)  # keep a reference: ctypes callbacks die with their Python object
    lib.espeak_SetSynthCallback(lib._ernie5_cb)
    _LIB = lib
    return lib


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (scipy, a scikit-learn dependency)."""
    if sr_in == sr_out:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


class Speaker:
    """`say(text, voice, rate, pitch) -> float32 waveform at `sample_rate`` (peak-normalised to 0.9)."""

    def __init__(self, sample_rate: int = 16000, fallback: bool = True):
        self.sample_rate = sample_rate
        try:
            self._lib = _load()
            self.engine = "espeak-ng"
        except (ImportError, OSError) as e:
            if not fallback:
                raise UserError("espeakng-loader", f"espeak-ng unavailable ({e}); pip install espeakng-loader")
            self._lib = None
            self.engine = "synthetic-tone-code"  # NOT speech: a chord per digit word, labelled as such

    def say(self, text: str, voice: str = "en", rate: int = 170, pitch: int = 50) -> np.ndarray:
        if self._lib is None:
            return self._tone_code(text)
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"voice {voice!r}", "not an espeak-ng voice")
        lib.espeak_SetParameter(_espeakRATE, rate, 0)
        lib.espeak_SetParameter(_espeakPITCH, pitch, 0)
        lib._ernie5_chunks.clear()
        data = text.encode("utf-8")
        lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _espeakCHARS_UTF8, None, None)
        if not lib._ernie5_chunks:
            return np.zeros(self.sample_rate // 10, np.float32)
        pcm = np.concatenate(lib._ernie5_chunks).astype(np.float32) / 32768.0
        wav = resample(pcm, lib._ernie5_rate, self.sample_rate)
        return (0.9 * wav / max(float(np.abs(wav).max()), 1e-6)).astype(np.float32)

    def _tone_code(self, text: str) -> np.ndarray:
        """Fallback: 0.4 s per word, a chord whose pitches encode the word's hash (deterministic)."""
        out, t = [], np.arange(int(0.4 * self.sample_rate)) / self.sample_rate
        for word in text.split():
            h = sum(map(ord, word))
            tone = sum(np.sin(2 * np.pi * (220 + 55 * ((h >> (3 * i)) % 8) * (i + 1)) * t) for i in range(3))
            out.append(0.3 * tone * np.hanning(len(t)))
        return np.concatenate(out).astype(np.float32) if out else np.zeros(1600, np.float32)
