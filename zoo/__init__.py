"""The recipes that train the embedded digits world (`erasure zoo build`), on the shared training
loop of `erasure.training`. Nothing at run time imports this package: the models' runtime pieces
(names, renders, paths, the judge's network) live in `pipelines/zoo/`."""
