"""LongBench's per-task metrics, written from the published definitions of the official evaluation
(THUDM/LongBench ``metrics.py`` / ``eval.py``), each returning a value in [0, 1] for one gold answer.

The official scorer keeps the best value over the gold answers and reports the mean x 100; ``score``
below does the per-sample part. Libraries: ROUGE-L is the ``rouge`` package (pltrdy, 1.0.1), the one the
official evaluation calls, so summaries are split and tokenised exactly as there; code similarity is
``rapidfuzz``'s Indel ratio rounded to a whole percent, which is what ``fuzzywuzzy.fuzz.ratio`` returns
with its C speed-up (``thefuzz`` and ``fuzzywuzzy[speedup]`` agree; fuzzywuzzy's pure-difflib fallback can
differ by a point on some lines). Chinese tokenisation uses ``jieba`` (optional extra ``kvbench[zh]``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz import fuzz
from rouge import Rouge

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGITS = re.compile(r"\d+")
_EN_PUNCT = frozenset(string.punctuation)
# The official list of Chinese punctuation removed by the Chinese normaliser, plus ASCII punctuation.
_ZH_PUNCT = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
    + "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop ASCII punctuation, drop articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower case, drop Chinese and ASCII punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def token_f1(prediction: Sequence[str], gold: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 when nothing overlaps."""
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise RuntimeError("Chinese LongBench metrics need jieba: pip install 'kvbench[zh]'") from None
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in _jieba_cut(text)) if t]

    return token_f1(tokens(prediction), tokens(gold))


def rouge_l(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 where it raises (an empty or all-dots text), as officially."""
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores([prediction], [gold], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


def rouge_l_zh(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    return rouge_l(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(gold)))


def classification(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    """1 / (number of class names found in the prediction) if the gold class is among them, else 0.

    Class names that are substrings of the gold name (but not it) are dropped from the matches. The official
    code drops them while iterating over the same list, which skips the entry right after each dropped one;
    that behaviour is reproduced here so scores match the published ones.
    """
    matches = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matches):
        if matches[i] in gold and matches[i] != gold:
            del matches[i]
        i += 1
    return 1.0 / len(matches) if gold in matches else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
    """Share of the digit runs in the prediction that equal `wanted`; 0 when there is none."""
    numbers = _DIGITS.findall(prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    """Gold "Paragraph N": the share of numbers in the prediction that are N."""
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", gold)[0])


def retrieval_zh(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    return _share_equal(prediction, re.findall(r"段落(\d+)", gold)[0])


def count(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    return _share_equal(prediction, str(gold))


def code_similarity(prediction: str, gold: str, all_classes: Sequence[str] = ()) -> float:
    """Edit similarity of the first prediction line that holds no '`', '#' or '//' with the gold line."""
    lines = prediction.lstrip("\n").split("\n")
    first = next((line for line in lines if "`" not in line and "#" not in line and "//" not in line), "")
    return round(fuzz.ratio(first, gold)) / 100


Metric = Callable[..., float]

# metric name (recorded in result rows) -> function
METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_similarity,
}

# Tasks whose prediction is cut to its first line before scoring.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score(dataset: str, metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str]) -> float:
    """One sample's score in 0-100: best metric value over the gold answers, x 100."""
    if dataset in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    return 100.0 * max((fn(prediction, gold, all_classes=all_classes) for gold in answers), default=0.0)


def length_bucket(length: int) -> str:
    """LongBench-E's bucket of a row's official "length" (words; characters for Chinese)."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def official_average(sample_scores: Sequence[float]) -> float:
    """A dataset's official result from its samples' scores (each 0-100): the mean, rounded to 2 decimals."""
    return round(sum(sample_scores) / len(sample_scores), 2)


def official_average_e(sample_scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float]:
    """LongBench-E's result: the mean per length bucket of the rows' "length" (NaN for an empty bucket)."""
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for value, length in zip(sample_scores, lengths, strict=True):
        buckets[length_bucket(length)].append(value)
    return {name: official_average(values) if values else float("nan") for name, values in buckets.items()}
