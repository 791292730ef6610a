"""The stateful VAD: chunking does not change its decisions."""

from __future__ import annotations

import numpy as np
import pytest

from live_qc.captions.vad import RATE, WINDOW, StreamingVad, load_vad_session
from caption_audio import espeak


@pytest.fixture(scope="module")
def session():
    return load_vad_session()


@pytest.fixture(scope="module")
def signal(tmp_path_factory) -> np.ndarray:
    speech = espeak(tmp_path_factory.mktemp("vad"), "Good evening. We are live from the main stage tonight.")
    gap = np.zeros(RATE, np.float32)
    return np.concatenate([gap, speech, gap, gap, speech, gap])


def run(session, x: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, list]:
    vad = StreamingVad(session)
    probs, events, pos, i = [], [], 0, 0
    while pos < len(x):
        n = sizes[i % len(sizes)]
        events += vad.feed(x[pos:pos + n])
        probs.append(vad.last_probs)
        pos += n
        i += 1
    return np.concatenate(probs), events


def test_one_chunk_or_many_gives_the_same_decisions(session, signal) -> None:
    whole_p, whole_e = run(session, signal, [len(signal)])
    for sizes in ([WINDOW], [320], [37, 1000, 4096, 160], [RATE // 2]):
        p, e = run(session, signal, sizes)
        assert len(p) == len(whole_p)
        np.testing.assert_allclose(p, whole_p, atol=1e-5)
        assert e == whole_e
    # Two utterances, each a start and an end at sensible places.
    assert [ev.speech for ev in whole_e] == [True, False, True, False]
    assert 0.8 * RATE <= whole_e[0].sample <= 1.5 * RATE


def test_matches_faster_whisper_on_a_whole_signal(session, signal) -> None:
    from faster_whisper.vad import get_vad_model
    x = signal[: len(signal) // WINDOW * WINDOW]
    reference = np.asarray(get_vad_model()(x)).ravel()
    vad = StreamingVad(session)
    vad.feed(x[:12345])
    first = vad.last_probs
    vad.feed(x[12345:])
    np.testing.assert_allclose(np.concatenate([first, vad.last_probs]), reference, atol=1e-5)


def test_state_is_carried_unlike_a_fresh_call(session, signal) -> None:
    """Why the wrapper exists: restarting the state at each chunk (what
    faster-whisper's wrapper does per call) gives other probabilities."""
    from faster_whisper.vad import get_vad_model
    x = signal[: len(signal) // (8 * WINDOW) * 8 * WINDOW]
    fresh = np.concatenate([np.asarray(get_vad_model()(c)).ravel() for c in x.reshape(-1, 8 * WINDOW)])
    ours, _ = run(session, x, [8 * WINDOW])
    assert np.abs(fresh - ours).max() > 0.05


def test_silence_and_reset(session) -> None:
    vad = StreamingVad(session)
    assert vad.feed(np.zeros(5 * RATE, np.float32)) == []
    assert not vad.speaking
    vad.feed(np.zeros(100, np.float32))
    vad.reset()
    # The pending remainder is counted, so sample indices stay monotonic.
    assert vad.samples_seen == 5 * RATE + 100
