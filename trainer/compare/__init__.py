"""`python -m trainer.compare RUN_DIR`: one web page, served on loopback, that compares a run's
checkpoints side by side while the run goes on.

Pieces: `folder` reads the run folder (read-only, never its lock), `models` holds the checkpoints'
weights (LoRA adapters on one shared base, full models in a bounded LRU cache) and generates with
`trainer.generate`'s semantics, `app` is the FastAPI app (JSON endpoints and the page), `page` is the
page itself (inline CSS and JavaScript), `__main__` is the command line.
"""
