"""The web app on the library (``sample/app.py`` starts it): the request service, the page's fields as
sampling requests, upload checks and the gradio page. No library package imports it; only the page
needs gradio (the ``app`` extra), imported when the page is built."""
