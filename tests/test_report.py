from trainer.report import CheckpointSummary, render_report


def test_report_is_a_table_of_checkpoints_by_prompts():
    samples = lambda *texts: [{"completion": t} for t in texts]
    text = render_report(
        "Run", ["a ->\nb", "c"],
        [CheckpointSummary(2, 0.5, 1.25, None, samples(" x|y", " line\nbreak")),
         CheckpointSummary(4, 1.0, 0.5, 0.75, samples(" z", ""))],
    )
    lines = text.splitlines()
    assert '1. `"a ->\\nb"`' in lines
    assert "| checkpoint | epoch | train loss | eval loss | prompt 1 | prompt 2 |" in lines
    assert "| checkpoint-2 | 0.50 | 1.2500 | - |  x\\|y |  line<br>break |" in lines
    assert "| checkpoint-4 | 1.00 | 0.5000 | 0.7500 |  z |   |" in lines
