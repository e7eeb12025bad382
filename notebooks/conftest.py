"""pytest --nbmake runs every notebook here top to bottom, each in its own kernel, in the tiny setting.

The kernels inherit this process's environment: KDJAX_NOTEBOOK_TINY=1 (each notebook shrinks its run to a
tiny config), and from the root conftest.py the JAX CPU backend with 8 fake devices (the notebooks'
data-parallel paths run sharded, as on a TPU's cores) and the persistent compilation cache.
"""

import os

os.environ["KDJAX_NOTEBOOK_TINY"] = "1"
