"""opsvlm: fine-tune vision-language models on video of human work with Ray, track them in MLflow, serve them."""

__version__ = "0.1.0"
