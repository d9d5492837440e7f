"""research: a PyTorch Lightning framework for training and evaluating retrieval models.

The layers, top to bottom (docs/architecture.md): ``cli`` > ``runs`` > the LightningModules (``modules``) and
DataModules (``datamodules``) > ``zelo`` | ``training`` > ``retrieval`` > ``eval`` | ``models`` | ``losses`` >
``data`` > ``io`` | ``safety`` | ``seeds`` > ``errors``. A layer imports only layers below it."""
