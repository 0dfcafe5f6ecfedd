"""Integrations with model libraries, each importing its library lazily:
``tokenring.integrations.transformers`` (decoder LLM training). The library itself
never imports them."""
