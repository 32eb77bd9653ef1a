# One image for every Harbor service: `harbor serve allocator|registry|worker`.
FROM node:20-bookworm-slim AS build
WORKDIR /harbor
# The worker's native UDP module (node-gyp): a compiler, and the headers of the image's own Node.
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
ENV npm_config_nodedir=/usr/local
COPY package.json package-lock.json .npmrc turbo.json tsconfig.base.json buf.yaml ./
COPY proto ./proto
COPY libs ./libs
COPY services ./services
COPY test/e2e/package.json ./test/e2e/package.json
RUN npm ci --no-fund --no-audit && npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
WORKDIR /harbor
ENV NODE_ENV=production
COPY --from=build /harbor /harbor
ENTRYPOINT ["node", "/harbor/services/cli/bin/harbor.js"]
CMD ["serve", "all"]
