"""Files and sources: model sources, safetensors, the manifest, datasets, the Hub, export extensions. No model kinds."""
