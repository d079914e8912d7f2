"""Stage 2's verdict: one sentence saying whether the model reads the EEG, and what to change.

Two lines of evidence, both from the test split: the paired-bootstrap interval of (EEG - noise)
BLEU-1 and the retrieval permutation test (:mod:`trainer.text_eval`). The model reads the EEG
when the interval lies above zero *and* retrieval from EEG beats re-paired EEG (p < 0.05); when
only one holds the sentence says so and the verdict stays false. Advice comes only from what
the run itself shows (its predictions, losses, steps and data), so it names a setting to change
and the figure that calls for it. Plain Python on the flat metrics; nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

P_THRESHOLD = 0.05
MIN_PASSES = 20
"""Passes over the training sentences below which a run that learned nothing is told to train longer."""


@dataclass(frozen=True)
class RunFacts:
    """What the verdict's advice reads besides the metrics."""

    steps: int
    batch_size: int
    lr: float
    train_sentences: int
    train_texts: int
    losses: list[float] = field(default_factory=list)
    """The last per-step training losses (oldest first)."""


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _evidence(m: dict) -> tuple[bool, bool, str]:
    diff, low, high = (m["test_bleu1_eeg_minus_noise"], m["test_bleu1_eeg_minus_noise_ci_low"],
                       m["test_bleu1_eeg_minus_noise_ci_high"])
    bleu_ok = low > 0
    gap = (f"exceeds noise by {diff:.2f}" if diff > 0 else f"falls below noise by {-diff:.2f}" if diff < 0
           else "equals noise's")
    bleu = f"BLEU-1 from EEG {gap} (95% interval {low:.2f} to {high:.2f}"
    bleu += ")" if bleu_ok else (", which contains zero)" if high >= 0 else ", below zero)")
    p = m.get("test_retrieval_p_eeg_vs_shuffled")
    if p is None:
        return bleu_ok, True, bleu
    retrieval_ok = p < P_THRESHOLD
    retrieval = (f"retrieval top-1 {_pct(m['test_retrieval_top1_eeg'])} against chance "
                 f"{_pct(m['test_retrieval_top1_chance'])} (p={p:.3f})")
    return bleu_ok, retrieval_ok, f"{bleu}; {retrieval}"


def advice(m: dict, facts: RunFacts) -> list[str]:
    """What to change, each with the figure of this run that calls for it (empty if nothing does)."""
    out = []
    distinct = m.get("test_distinct_eeg")
    if distinct is not None and distinct < 0.2:
        out.append(f"The model writes nearly the same text whatever the input ({_pct(distinct)} of its test "
                   f"predictions are distinct): it has learned the commonest words, not the EEG. Train longer "
                   f"(more steps) or with a higher lr (now {facts.lr:g}).")
    tail = facts.losses
    if len(tail) >= 10:
        half = len(tail) // 2
        early, late = sum(tail[:half]) / half, sum(tail[half:]) / (len(tail) - half)
        if late < 0.97 * early:
            out.append(f"The training loss was still falling when training stopped ({early:.3f} to {late:.3f} "
                       f"over the last {len(tail)} steps): more steps should help.")
    passes = facts.steps * facts.batch_size / max(1, facts.train_sentences)
    if passes < MIN_PASSES:
        wanted = -(-MIN_PASSES * facts.train_sentences // max(1, facts.batch_size))
        out.append(f"{facts.steps} steps of batch {facts.batch_size} show each of the {facts.train_sentences} "
                   f"training sentences {passes:.1f} times; try steps of at least {wanted} "
                   f"({MIN_PASSES} passes).")
    val, train = m.get("val_loss_teacher_forced_diagnostic"), m.get("train_loss")
    if val is not None and train is not None and val > 1.5 * train + 0.1:
        out.append(f"The validation loss ({val:.3f}) is far above the training loss ({train:.3f}): the decoder "
                   f"memorises its training sentences; fewer steps, more sentences or a smaller preset.")
    eeg, length_only = m.get("test_bleu1_eeg"), m.get("test_bleu1_length_only")
    if eeg is not None and length_only is not None and eeg <= length_only:
        out.append(f"BLEU-1 from EEG ({eeg:.3f}) is no better than the length-only control's ({length_only:.3f}): "
                   f"the model uses at most how long the sentence is.")
    if facts.train_texts >= 0.8 * facts.train_sentences:
        out.append(f"Almost every training sentence is a different text ({facts.train_texts} texts in "
                   f"{facts.train_sentences} sentences): the decoder sees each text's EEG about once; a dataset "
                   f"with fewer distinct sentences, each read more often, is easier to learn from.")
    out.append("Check the Stage 1 encoder's word probe (probe_acc against probe_acc_random_init in its job): "
               "features that do not tell words apart give the decoder nothing to read.")
    return out


def verdict(m: dict, facts: RunFacts) -> dict:
    """``{"reads_eeg": bool, "sentence": str, "advice": [str, ...]}`` for a finished Stage 2 run.

    ``advice`` is empty when the model reads the EEG.
    """
    bleu_ok, retrieval_ok, evidence = _evidence(m)
    if bleu_ok and retrieval_ok:
        return {"reads_eeg": True, "sentence": f"reads the EEG: {evidence}", "advice": []}
    lead = ("weak evidence that the model reads the EEG (the two tests disagree)" if bleu_ok or
            (retrieval_ok and m.get("test_retrieval_p_eeg_vs_shuffled") is not None) else
            "no evidence that the model reads the EEG")
    return {"reads_eeg": False, "sentence": f"{lead}: {evidence}", "advice": advice(m, facts)}
