from trainer.report import CheckpointSummary, render_report


def test_report_is_a_table_of_checkpoints_by_prompts():
    samples = lambda *texts: [{"completion": t} for t in texts]
    text = render_report(
        "Run",
        ["a ->\nb", "c"],
        [
            CheckpointSummary(2, 0.5, 1.25, None, samples(" x|y", " line\nbreak")),
            CheckpointSummary(4, 1.0, 0.5, 0.75, samples(" z", "")),
        ],
    )
    lines = text.splitlines()
    assert '1. `"a ->\\nb"`' in lines
    assert "| checkpoint | epoch | train loss | eval loss | prompt 1 | prompt 2 |" in lines
    assert "| checkpoint-2 | 0.50 | 1.2500 | - |  x\\|y |  line<br>break |" in lines
    assert "| checkpoint-4 | 1.00 | 0.5000 | 0.7500 |  z |   |" in lines


def test_metrics_are_columns_and_the_recommended_checkpoint_is_named_with_why():
    from trainer.recommend import Recommendation

    checkpoints = [
        CheckpointSummary(2, 0.5, 1.25, 0.9, [{"completion": " a"}]),  # from a state saved before metrics existed
        CheckpointSummary(4, 1.0, 0.5, 0.75, [{"completion": " b"}], {"exact_match": 0.5, "item_f1": 0.625}, 8),
        CheckpointSummary(6, 1.5, 0.25, 0.8, [{"completion": " c"}], {"exact_match": 0.875, "item_f1": 0.9}, 8),
    ]
    lines = render_report("Run", ["p"], checkpoints).splitlines()
    assert lines[2] == (
        "Recommended: **checkpoint-6**: highest exact_match (0.8750 on 8 validation examples) of 2 checkpoints."
    )
    assert "| checkpoint | epoch | train loss | eval loss | exact_match | item_f1 | prompt 1 |" in lines
    assert "| checkpoint-2 | 0.50 | 1.2500 | 0.9000 | - | - |  a |" in lines
    assert "| checkpoint-4 | 1.00 | 0.5000 | 0.7500 | 0.5000 | 0.6250 |  b |" in lines
    given = Recommendation("checkpoint-4", "eval_loss", 0.75, "lowest eval loss")
    assert (
        render_report("Run", ["p"], checkpoints, given).splitlines()[2]
        == "Recommended: **checkpoint-4**: lowest eval loss."
    )
    no_losses = [CheckpointSummary(2, 0.5, 1.0, None, [{"completion": " a"}])]
    assert render_report("Run", ["p"], no_losses).splitlines()[2] == (
        "Recommended: none yet (no task metric and no eval loss to rank the checkpoints by)."
    )
