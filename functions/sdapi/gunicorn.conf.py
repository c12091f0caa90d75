"""gunicorn settings for the sd-api container (the Dockerfile's CMD passes this file)."""
import os

# FC forwards to the port in customContainerConfig (9000); 127.0.0.1 would give FunctionNotStarted.
bind = f"0.0.0.0:{os.environ.get('SDFC_PORT', '9000')}"
# One worker: one engine, one copy of the model in GPU memory. FC scales out with more instances.
workers = 1
worker_class = "gthread"
# Progress, options and list routes answer while a generation holds the GPU. Keep it >= the function's
# instanceConcurrency in s.yaml, or FC would send requests that wait for a thread.
threads = int(os.environ.get("SDFC_THREADS", "4"))
timeout = 0            # generations are long; FC's function timeout bounds every request
graceful_timeout = 30  # /pre-stop has drained already when FC stops the container
accesslog = None       # the app writes one JSON line per request itself
loglevel = "info"
control_socket_disable = True  # gunicorn >= 24 would open a control socket in $HOME (none for this user)
