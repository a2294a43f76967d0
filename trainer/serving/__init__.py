"""The HTTP server behind `python -m trainer.serve`: request schemas, the generation worker that
owns the model, and the FastAPI app with the seed's and the OpenAI-compatible routes."""
