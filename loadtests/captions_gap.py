"""Where the streaming WER gap comes from (issue 13): the errors the
streamer makes that the same model offline on the whole file does not.

::

    captions_bench.py --clock model --trace trace.jsonl --dump dump.json
      trace: every committed word (text, start, end, latency, why committed)
      dump:  the script's paragraphs with their times, the offline words
    ──► word alignment (Levenshtein, backtraced) of the reference against
        the committed streaming words and against the offline words
    ──► per reference word: streaming right/wrong, offline right/wrong;
        insertions per gap between reference words
    ──► the errors streaming makes and offline does not, broken down by
        minute, commit reason, position in the utterance, error type;
        runs of deleted words with the decodes that covered them; errors
        at the seam between two commits; repeated corpus sentences; the
        worst sentences side by side

    .venv/bin/python loadtests/captions_bench.py --model tiny.en --minutes 10 --clock model --seed 13 \\
        --nonspeech-minutes 0 --trace trace.jsonl --dump dump.json
    .venv/bin/python loadtests/captions_gap.py --trace trace.jsonl --dump dump.json

A reference word's time is interpolated inside its paragraph (the script
has no forced alignment; espeak-ng reads at a steady rate). An utterance
here is a paragraph of the script (what the VAD hears as one stretch of
speech: paragraphs are 0.4–8 s apart). Commit reasons are the policy's:
agreement, timeout, end_of_speech (the final decode), flush (the last
hypothesis committed as it stands), and "retry:" before any of them where
the words came from a retried decode (StreamerOptions.retry_dropped).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtests.speech import _tokens  # noqa: E402



def _consecutive(items: list, index) -> list[list]:
    """``items`` (sorted by ``index``) in runs of consecutive indexes."""
    runs: list[list] = []
    for item in items:
        if runs and index(item) == index(runs[-1][-1]) + 1:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs

def align(ref: list[str], hyp: list[str]) -> list[tuple[str, int | None, int | None]]:
    """Word-level Levenshtein alignment: ("ok" | "sub", i, j), ("del", i,
    None), ("ins", None, j), in order. Ties prefer a diagonal step, then a
    deletion (so that a run of extra words is reported as insertions at the
    place they were said)."""
    n, m = len(ref), len(hyp)
    d = [list(range(m + 1))]
    for i in range(1, n + 1):
        row = [i] + [0] * m
        prev = d[i - 1]
        r = ref[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (r != hyp[j - 1]), prev[j] + 1, row[j - 1] + 1)
        d.append(row)
    ops = []
    i, j = n, m
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            ops.append(("ok" if ref[i - 1] == hyp[j - 1] else "sub", i - 1, j - 1))
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            ops.append(("del", i - 1, None))
            i -= 1
        else:
            ops.append(("ins", None, j - 1))
            j -= 1
    return ops[::-1]


def reference(paragraphs: list[dict]) -> list[dict]:
    """The script's tokens with paragraph, sentence, position and time."""
    out = []
    sentence = 0
    for p, par in enumerate(paragraphs):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", par["text"]) if _tokens(s)]
        n = sum(len(_tokens(s)) for s in sentences)
        k = 0
        for s in sentences:
            toks = _tokens(s)
            for q, tok in enumerate(toks):
                t = par["start"] + (k + 0.5) / n * (par["end"] - par["start"])
                pos = "first 2" if k < 2 else ("last" if k == n - 1 else "middle")
                spos = "first 2" if q < 2 else ("last" if q == len(toks) - 1 else "middle")
                out.append({"tok": tok, "par": p, "sent": sentence, "k": k, "n": n, "t": t, "pos": pos,
                            "spos": spos, "sentence_text": s})
                k += 1
            sentence += 1
    return out


def streaming_words(trace: list[dict]) -> list[dict]:
    """Committed words in order, one entry per token, with their commit
    batch (one caption), reason and times."""
    out = []
    batch = 0
    for r in trace:
        last = None
        for c in r.get("commits", ()):
            text, end, latency, start, reason = (list(c) + [None, "?"])[:5] if len(c) < 5 else c
            if (reason, r["clock"]) != last:
                batch += 1
                last = (reason, r["clock"])
            for tok in _tokens(text):
                out.append({"tok": tok, "start": start, "end": end, "reason": reason, "batch": batch,
                            "latency": latency, "clock": r["clock"], "text": text})
    return out


def offline_words(words: list) -> list[dict]:
    return [{"tok": tok, "start": s, "end": e} for text, s, e in words for tok in _tokens(text)]


def per_reference(ref: list[dict], hyp: list[dict]) -> tuple[list[dict], dict[int, list[int]]]:
    """Per reference word: its op and the hyp index; insertions per gap
    (gap k: before reference word k; len(ref): after the last)."""
    status = [{"op": None, "j": None} for _ in ref]
    ins: dict[int, list[int]] = defaultdict(list)
    k = 0
    for op, i, j in align([r["tok"] for r in ref], [h["tok"] for h in hyp]):
        if op == "ins":
            ins[k].append(j)
        else:
            status[i] = {"op": op, "j": j}
            k = i + 1
    return status, ins


def run(trace_path: str, dump_path: str, worst: int = 30) -> dict:
    trace = [json.loads(line) for line in Path(trace_path).read_text().splitlines() if line.strip()]
    dump = json.loads(Path(dump_path).read_text())
    ref = reference(dump["paragraphs"])
    st = streaming_words(trace)
    off = offline_words(dump["offline_words"])
    s_status, s_ins = per_reference(ref, st)
    o_status, o_ins = per_reference(ref, off)
    n_ref = len(ref)

    def s_err(i: int) -> bool:
        return s_status[i]["op"] != "ok"

    def o_err(i: int) -> bool:
        return o_status[i]["op"] != "ok"

    # The errors streaming makes and offline does not (and the reverse).
    only: list[dict] = []  # streaming-only errors, one per word error
    offline_only = 0
    for i, r in enumerate(ref):
        if s_err(i) and not o_err(i):
            j = s_status[i]["j"]
            w = st[j] if j is not None else _nearest(st, s_status, i)
            only.append({"type": s_status[i]["op"], "i": i, "t": r["t"], "pos": r["pos"], "spos": r["spos"],
                         "par": r["par"],
                         "sent": r["sent"], "reason": w["reason"] if w else "?", "j": j,
                         "batch": w["batch"] if w else None})
        elif o_err(i) and not s_err(i):
            offline_only += 1
    for k in range(n_ref + 1):
        extra = len(s_ins.get(k, [])) - len(o_ins.get(k, []))
        if extra > 0:
            for j in s_ins[k][-extra:]:
                w = st[j]
                pos, par, sent = _gap_position(ref, k, w["start"])
                spos = _gap_position(ref, k, w["start"], "spos")[0]
                only.append({"type": "ins", "i": None, "gap": k, "t": w["start"], "pos": pos, "spos": spos,
                             "par": par,
                             "sent": sent, "reason": w["reason"], "j": j, "batch": w["batch"]})
        elif extra < 0:
            offline_only += -extra
    s_total = sum(s_err(i) for i in range(n_ref)) + sum(len(v) for v in s_ins.values())
    o_total = sum(o_err(i) for i in range(n_ref)) + sum(len(v) for v in o_ins.values())

    report: dict = {"reference_words": n_ref, "streaming_errors": s_total, "offline_errors": o_total,
                    "wer_streaming": round(s_total / n_ref, 4), "wer_offline": round(o_total / n_ref, 4),
                    "streaming_only_errors": len(only), "offline_only_errors": offline_only,
                    "gap_points": round(100 * (s_total - o_total) / n_ref, 2)}

    # Breakdowns of the streaming-only errors.
    minutes = Counter(int(e["t"] // 60) for e in only)
    ref_minutes = Counter(int(r["t"] // 60) for r in ref)
    s_min = Counter(int(r["t"] // 60) for i, r in enumerate(ref) if s_err(i))
    o_min = Counter(int(r["t"] // 60) for i, r in enumerate(ref) if o_err(i))
    for k, v in s_ins.items():
        t = st[v[0]]["start"]
        s_min[int(t // 60)] += len(v)
    for k, v in o_ins.items():
        o_min[int(off[v[0]]["start"] // 60)] += len(v)
    report["by_minute"] = [{"minute": m, "ref_words": ref_minutes[m], "streaming_only": minutes[m],
                            "wer_streaming": round(s_min[m] / max(ref_minutes[m], 1), 3),
                            "wer_offline": round(o_min[m] / max(ref_minutes[m], 1), 3)}
                           for m in sorted(ref_minutes)]
    words_by_reason = Counter(_base(w["reason"]) for w in st)
    report["committed_words_by_reason"] = dict(words_by_reason)
    report["by_reason"] = _crosstab(only, lambda e: _base(e["reason"]), lambda e: e["type"])
    report["by_position"] = _crosstab(only, lambda e: e["pos"], lambda e: e["type"])
    report["ref_words_by_position"] = dict(Counter(r["pos"] for r in ref))
    report["by_sentence_position"] = _crosstab(only, lambda e: e["spos"], lambda e: e["type"])
    report["ref_words_by_sentence_position"] = dict(Counter(r["spos"] for r in ref))
    report["by_type"] = dict(Counter(e["type"] for e in only))
    # Wrong words by reason, all committed words (not only the streaming-only errors).
    wrong_by_reason: Counter = Counter()
    for i in range(n_ref):
        j = s_status[i]["j"]
        if j is not None and s_status[i]["op"] == "sub":
            wrong_by_reason[_base(st[j]["reason"])] += 1
    for v in s_ins.values():
        for j in v:
            wrong_by_reason[_base(st[j]["reason"])] += 1
    report["wrong_rate_by_reason"] = {r: round(wrong_by_reason[r] / n, 3) for r, n in words_by_reason.items()}

    # By the audio the committing decode heard (the buffer: an utterance's
    # first words are decoded from a second or two of audio), and how often
    # the guards dropped a decode whole at each buffer length.
    buffer_of = {r["clock"]: r["decodes"][-1]["audio_s"] for r in trace if r.get("decodes")}
    wrong = {e["j"] for e in only if e["type"] != "del"}
    words_by_buffer: Counter = Counter()
    wrong_by_buffer: Counter = Counter()
    for j, w in enumerate(st):
        b = _bucket(buffer_of.get(w["clock"], 0.0), (3, 6, 10))
        words_by_buffer[b] += 1
        wrong_by_buffer[b] += j in wrong
    report["by_buffer"] = {b: {"committed": n, "wrong_where_offline_right": wrong_by_buffer[b],
                               "rate": round(wrong_by_buffer[b] / n, 3)} for b, n in sorted(words_by_buffer.items(), key=_low)}
    decodes: dict = defaultdict(Counter)
    for r in trace:
        for d in r.get("decodes", ()):
            if d.get("retry"):
                continue
            c = decodes[_bucket(d["audio_s"], (1.5, 2.5, 5, 10))]
            c["decodes"] += 1
            c["dropped_whole"] += d["words"] == 0 and d["rejected"] > 0
            c["looped"] += d["looped"] > 0
    report["decodes_by_buffer"] = {b: dict(c) for b, c in sorted(decodes.items(), key=_low)}

    # Runs of deleted words (streaming-only): phrases or sentences lost.
    runs = _consecutive(sorted((e for e in only if e["type"] == "del"), key=lambda e: e["i"]), lambda e: e["i"])
    long_runs = [r for r in runs if len(r) >= 3]
    report["deletion_runs"] = {"runs_of_3_or_more": len(long_runs),
                               "words_in_them": sum(len(r) for r in long_runs),
                               "all_deleted": sum(len(r) for r in runs)}
    report["deletion_run_list"] = [_describe_run(r, ref, trace) for r in long_runs]

    # Insertions: repeats of committed words just before (a seam or a loop),
    # and words that repeat the prompt (the text committed before the decode).
    ins = [e for e in only if e["type"] == "ins"]
    repeat = 0
    for e in ins:
        j = e["j"]
        before = [w["tok"] for w in st[max(0, j - 12):j]]
        if st[j]["tok"] in before:
            repeat += 1
    report["insertions"] = {"n": len(ins), "word_seen_in_the_12_committed_before": repeat,
                            "runs": _runs_text([e for e in ins], st)}

    # The seam: errors at the first or last word of a commit batch.
    edge = set()
    for j in range(len(st)):
        if j == 0 or st[j - 1]["batch"] != st[j]["batch"] or j == len(st) - 1 or st[j + 1]["batch"] != st[j]["batch"]:
            edge.add(j)
    at_seam = [e for e in only if e["j"] is not None and e["j"] in edge and e["type"] != "del"]
    del_seam = 0
    for e in only:
        if e["type"] == "del":
            a, b = _neighbours(s_status, e["i"])
            if a is not None and b is not None and st[a]["batch"] != st[b]["batch"]:
                del_seam += 1
    report["seam"] = {"committed_words_at_a_batch_edge": len(edge), "committed_words": len(st),
                      "sub_ins_at_edge": len(at_seam),
                      "sub_ins_total": sum(e["type"] != "del" for e in only),
                      "deletions_between_two_batches": del_seam,
                      "deletions_total": sum(e["type"] == "del" for e in only)}

    # Sentences the corpus repeats: is a sentence said again (within the
    # prompt's reach or later) heard worse?
    sent_words: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(ref):
        sent_words[r["sent"]].append(i)
    sent_text = {s: ref[v[0]]["sentence_text"] for s, v in sent_words.items()}
    seen: dict[str, int] = {}
    groups: dict[str, list] = {"first time": [], "repeat, previous within 3 sentences": [], "repeat, later": []}
    only_by_sent = Counter(e["sent"] for e in only)
    for s in sorted(sent_words):
        key = " ".join(_tokens(sent_text[s]))
        g = "first time" if key not in seen else (
            "repeat, previous within 3 sentences" if s - seen[key] <= 3 else "repeat, later")
        seen[key] = s
        groups[g].append(s)
    report["repeated_sentences"] = {
        g: {"sentences": len(v), "ref_words": sum(len(sent_words[s]) for s in v),
            "streaming_only_errors": sum(only_by_sent[s] for s in v),
            "per_100_words": round(100 * sum(only_by_sent[s] for s in v)
                                   / max(sum(len(sent_words[s]) for s in v), 1), 1)}
        for g, v in groups.items()}

    # The worst sentences side by side.
    rows = []
    for s, idx in sent_words.items():
        gaps = range(idx[0], idx[-1] + 1)
        s_e = sum(s_err(i) for i in idx) + sum(len(s_ins.get(k, [])) for k in gaps)
        o_e = sum(o_err(i) for i in idx) + sum(len(o_ins.get(k, [])) for k in gaps)
        if s_e > o_e:
            rows.append((s_e - o_e, s, idx, s_e, o_e))
    rows.sort(key=lambda r: (-r[0], r[1]))
    report["worst_sentences"] = []
    for diff, s, idx, s_e, o_e in rows[:worst]:
        gaps = range(idx[0], idx[-1] + 1)
        s_j = sorted([s_status[i]["j"] for i in idx if s_status[i]["j"] is not None]
                     + [j for k in gaps for j in s_ins.get(k, [])])
        o_j = sorted([o_status[i]["j"] for i in idx if o_status[i]["j"] is not None]
                     + [j for k in gaps for j in o_ins.get(k, [])])
        report["worst_sentences"].append({
            "t": round(ref[idx[0]]["t"], 1), "extra_errors": diff, "streaming_errors": s_e, "offline_errors": o_e,
            "ref": sent_text[s], "offline": " ".join(off[j]["tok"] for j in o_j),
            "streaming": " ".join(st[j]["tok"] for j in s_j),
            "reasons": " ".join(sorted({st[j]["reason"] for j in s_j}))})
    return report


def _bucket(x: float, edges: tuple) -> str:
    """"a–b s" for the bucket of ``x`` (seconds) between ``edges``."""
    lo = 0
    for e in edges:
        if x < e:
            return f"{lo:>4}–{e} s"
        lo = e
    return f"{lo:>4}+ s"


def _low(item: tuple) -> float:
    return float(item[0].split("–")[0].replace("+ s", ""))


def _base(reason: str) -> str:
    return "retry" if reason.startswith("retry:") else reason


def _nearest(st: list[dict], status: list[dict], i: int) -> dict | None:
    a, b = _neighbours(status, i)
    j = b if b is not None else a
    return st[j] if j is not None else None


def _neighbours(status: list[dict], i: int) -> tuple[int | None, int | None]:
    """The hyp indices aligned to the nearest reference words before and after ``i``."""
    a = next((status[k]["j"] for k in range(i - 1, -1, -1) if status[k]["j"] is not None), None)
    b = next((status[k]["j"] for k in range(i + 1, len(status)) if status[k]["j"] is not None), None)
    return a, b


def _gap_position(ref: list[dict], k: int, t: float, unit: str = "pos") -> tuple[str, int, int]:
    """Where an insertion before reference word ``k`` (at time ``t``) sits
    in its utterance (``unit`` "pos") or sentence ("spos")."""
    group = "par" if unit == "pos" else "sent"
    if k >= len(ref):
        r = ref[-1]
        return "last", r["par"], r["sent"]
    nxt = ref[k]
    if k == 0:
        return "first 2", nxt["par"], nxt["sent"]
    prv = ref[k - 1]
    if prv[group] == nxt[group]:
        # Inside: before the group's second word is among the first two.
        return ("first 2" if nxt[unit] == "first 2" else "middle"), nxt["par"], nxt["sent"]
    # Between two utterances: the nearer one in time.
    if t - prv["t"] < nxt["t"] - t:
        return "last", prv["par"], prv["sent"]
    return "first 2", nxt["par"], nxt["sent"]


def _crosstab(items: list[dict], row, col) -> dict:
    out: dict = defaultdict(Counter)
    for e in items:
        out[row(e)][col(e)] += 1
    return {r: dict(c, total=sum(c.values())) for r, c in sorted(out.items())}


def _runs_text(ins: list[dict], st: list[dict]) -> list[str]:
    """Consecutive inserted words as phrases, with their time and reason."""
    runs = _consecutive(sorted(e["j"] for e in ins), lambda j: j)
    return [f"{st[r[0]]['start']:.1f}s [{st[r[0]]['reason']}] " + " ".join(st[j]["tok"] for j in r)
            for r in sorted(runs, key=len, reverse=True)]


def _describe_run(run: list[dict], ref: list[dict], trace: list[dict]) -> dict:
    """A run of deleted words and the decodes whose audio covered it."""
    t0, t1 = ref[run[0]["i"]]["t"], ref[run[-1]["i"]]["t"]
    decodes = []
    for r in trace:
        media = r.get("media")
        for d in r.get("decodes", ()):
            if media is None or not (media - d["audio_s"] <= t1 and media >= t0):
                continue
            decodes.append(("R" if d.get("retry") else "") + ("F" if d.get("final") else "")
                           + f"{d['words']}w/{d['rejected']}rej/{d['looped']}loop")
    return {"t": round(t0, 1), "words": len(run), "text": " ".join(ref[e["i"]]["tok"] for e in run),
            "reasons_around": sorted({e["reason"] for e in run}),
            "decodes_covering": len(decodes),
            "decodes_with_no_words": sum(d.split("w/")[0].lstrip("RF") == "0" for d in decodes),
            "decodes": " ".join(decodes[-12:])}


def print_report(report: dict) -> None:
    p = print
    p(f"reference words {report['reference_words']}: streaming {report['streaming_errors']} errors "
      f"(WER {report['wer_streaming']:.1%}), offline {report['offline_errors']} ({report['wer_offline']:.1%}), "
      f"gap {report['gap_points']} points")
    p(f"errors streaming makes and offline does not: {report['streaming_only_errors']}; "
      f"the reverse: {report['offline_only_errors']}")
    p("\nby minute (streaming-only errors; WER of each minute):")
    p("  minute  ref words  streaming-only  WER streaming  WER offline")
    for m in report["by_minute"]:
        p(f"  {m['minute']:6d}  {m['ref_words']:9d}  {m['streaming_only']:14d}  {m['wer_streaming']:13.1%}"
          f"  {m['wer_offline']:11.1%}")
    p(f"\ncommitted words by reason: {report['committed_words_by_reason']}")
    p(f"wrong (sub + ins) per committed word, by reason: {report['wrong_rate_by_reason']}")
    p(f"\nby commit reason (deletions: the reason of the next committed word): {report['by_reason']}")
    p(f"by position in the utterance: {report['by_position']}")
    p(f"  (reference words by position: {report['ref_words_by_position']})")
    p(f"by position in the sentence: {report['by_sentence_position']}")
    p(f"  (reference words by position in the sentence: {report['ref_words_by_sentence_position']})")
    p(f"by type: {report['by_type']}")
    p("\ncommitted words by the audio the committing decode heard (wrong: sub/ins where offline was right):")
    for b, v in report["by_buffer"].items():
        p(f"  {b}: {v}")
    p("decodes (not retries) by their audio: dropped whole by the guards, looped:")
    for b, v in report["decodes_by_buffer"].items():
        p(f"  {b}: {v}")
    p(f"\ndeletions: {report['deletion_runs']}")
    for r in report["deletion_run_list"]:
        p(f"  {r['t']:7.1f}s {r['words']:3d} words [{','.join(r['reasons_around'])}] {r['text']!r}\n"
          f"           decodes covering {r['decodes_covering']} ({r['decodes_with_no_words']} with no words): "
          f"{r['decodes']}")
    p(f"\ninsertions: {report['insertions']['n']}, of which a word among the 12 committed before: "
      f"{report['insertions']['word_seen_in_the_12_committed_before']}")
    for line in report["insertions"]["runs"][:25]:
        p(f"  {line}")
    p(f"\nseam: {report['seam']}")
    p(f"repeated sentences: {json.dumps(report['repeated_sentences'])}")
    p(f"\nworst {len(report['worst_sentences'])} sentences (extra errors, streaming / offline):")
    for w in report["worst_sentences"]:
        p(f"  {w['t']:7.1f}s +{w['extra_errors']} ({w['streaming_errors']}/{w['offline_errors']}) [{w['reasons']}]\n"
          f"      ref: {w['ref']}\n      off: {w['offline']}\n      str: {w['streaming']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, help="captions_bench.py --trace output")
    ap.add_argument("--dump", required=True, help="captions_bench.py --dump output (same run)")
    ap.add_argument("--worst", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = run(args.trace, args.dump, args.worst)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
