"""The eval command's data handling and metrics (the queue part runs in test_pipeline.py)."""

from __future__ import annotations

import pytest

from producer.evaluate import Prediction, Row, balanced_sample, format_summary, read_rows, summarize


def write_csv(tmp_path, lines: list[str]):
    path = tmp_path / "data.csv"
    path.write_text("label,review\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_rows_maps_label_values(tmp_path):
    path = write_csv(tmp_path, ["1,好吃", "0,难吃", "正面,不错", "negative,bad", "2,一般", "1,  "])
    assert [r.gold for r in read_rows(path)] == [0, 1, 0, 1, 2]  # the empty text is skipped


def test_read_rows_names_bad_labels_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match=r"data.csv:3: label 'maybe'"):
        read_rows(write_csv(tmp_path, ["1,好吃", "maybe,嗯"]))
    with pytest.raises(ValueError, match=r"no column \['text'\]"):
        read_rows(write_csv(tmp_path, ["1,好吃"]), text_column="text")


def test_balanced_sample_is_balanced_and_repeatable():
    rows = [Row(f"p{i}", 0) for i in range(50)] + [Row(f"n{i}", 1) for i in range(200)]
    sample = balanced_sample(rows, 40, seed=3)
    assert sum(r.gold == 0 for r in sample) == 20 and len(sample) == 40
    assert sample == balanced_sample(rows, 40, seed=3)
    assert sample != balanced_sample(rows, 40, seed=4)
    with pytest.raises(ValueError, match="too few rows"):
        balanced_sample(rows, 200)


def prediction(gold, predicted, confidence, classifier="prompt:fewshot"):
    p_pos = confidence if predicted == "正面" else 1 - confidence
    return Prediction("t", gold, predicted, confidence, p_pos, "succeeded", 10.0, 100.0, "id", classifier)


def test_summary_metrics():
    predictions = [prediction("正面", "正面", 0.9), prediction("正面", "负面", 0.6),
                   prediction("负面", "负面", 0.95), prediction("负面", "负面", 0.7)]
    summary = summarize(predictions, "zh")
    assert summary["accuracy"] == 0.75 and summary["valid_label_share"] == 1.0
    assert summary["per_class"]["正面"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                           "support": 2}
    assert summary["confusion"]["正面"] == {"正面": 1, "负面": 1}
    assert summary["calibration"]["0.9-1.0"] == {"rows": 2, "accuracy": 1.0}
    assert summary["calibration"]["0.6-0.7"] == {"rows": 1, "accuracy": 0.0}
    # p(positive) of the miss is 0.4: a threshold of 0.35 gets it right, and nothing else wrong.
    assert summary["threshold_sweep"]["0.35"] == 1.0 and summary["threshold_sweep"]["0.50"] == 0.75
    text = format_summary(summary)
    assert "accuracy 0.750 on 4 rows" in text and "best POSITIVE_THRESHOLD on this data: 0.35" in text
    assert "classifier: prompt:fewshot (4 rows)" in text


def test_percentile_interpolates_and_handles_empty():
    from producer.evaluate import percentile

    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.5 and percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 95) == 95


def test_summary_of_failed_rows_prints_without_latencies():
    failed = Prediction("t", "正面", None, None, None, "WaitTimeout", None, None, None)
    summary = summarize([failed], "zh")
    assert summary["accuracy"] == 0.0 and summary["valid_label_share"] == 0.0 and summary["failed_jobs"] == 1
    assert "latency per job: mean n/a ms, p95 n/a ms" in format_summary(summary)
