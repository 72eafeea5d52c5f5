"""`python -m xlab.serve ckpt=PATH [ckpt2=PATH]`: a playground page and an OpenAI-compatible completions API.

- xlab/serve/__main__.py: the Hydra entry point (configs/serve.yaml, ServeConfig there);
- xlab/serve/app.py: the HTTP routes (FastAPI + uvicorn, the optional `serve` extra; imported only here);
- xlab/serve/api.py: the request schema and the OpenAI response objects;
- xlab/serve/batcher.py: the worker that batches concurrent requests through xlab.inference.generate_ids;
- xlab/serve/static/index.html: the page.
"""
