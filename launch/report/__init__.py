"""`dldkd report`: runs read from MLflow, statistics and paired claims, Markdown and plots."""
