"""The GeoPix model: vision encoder, projector, LLM, seg tokens, mask predictor, class memory (stage: model)."""
