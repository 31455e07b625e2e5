"""A harness for running this pack inside a real ComfyUI without weights: boot ComfyUI in-process
(comfy_bootstrap) or as a server (comfy_server), build tiny random-weight models with ComfyUI's own classes
(tiny_models, tiny_dit_models, tiny_checkpoint, tiny_adapters, tiny_loras), drive its frontend in a headless browser
(browser, browser_viewer) and derive test tolerances (tolerance). Used by tests/, bench/ and the shipped scripts
(scripts/demo.py, scripts/train_tova.py, scripts/build_workflows.py); never imported by the pack itself."""
