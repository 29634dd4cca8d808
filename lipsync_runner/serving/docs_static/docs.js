// Swagger UI for /docs.json (rewritten by lipsync_runner/serving/docs_page.py). validatorUrl null:
// the default would load a badge image from validator.swagger.io, which is not reachable offline.
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "./docs.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    persistAuthorization: false,
  });
});
