"""The stand-alone services: the edge agent, the LLM service, streaming inference."""
