# Repo-local Jupyter settings (the Makefile points JUPYTER_CONFIG_DIR here).
# The course runs offline: nothing may phone home or offer to install extensions.
c = get_config()  # noqa: F821 (provided by Jupyter)
c.LabApp.extension_manager = "readonly"
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.LabApp.news_url = None
c.ServerApp.open_browser = True
