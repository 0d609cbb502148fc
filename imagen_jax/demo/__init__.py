"""The web demo (Gradio): `models.py` loads what the page offers and generates through the
sampling job of `sample.py` (`pipelines.jobs.run_job`), `text_to_image.py` is the tab, and
`app.py` puts the tabs, the queue and the history together. `demo.py` launches it."""
